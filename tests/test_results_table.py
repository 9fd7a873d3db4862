"""experiments/cifar10_50.py (on the step engine of experiments/steps.py): its steps are valid
raypipe commands, and the table it writes from run folders computes seed statistics and val
decisions correctly (no Ray, no training)."""
import json
from pathlib import Path

import pytest

from experiments import cifar10_50, teacher_study, tinyimagenet_50
from experiments.steps import Step
from raypipe.cli import _load, build_parser
from raypipe.config import load_config
from raypipe.models import arch_of

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repro(tmp_path, monkeypatch):
    """The CIFAR-10 runner, its run folders, records and table under tmp_path."""
    monkeypatch.chdir(REPO)  # config paths in the steps are relative to the repository
    return cifar10_50.Cifar10(runs=tmp_path / "runs", records=tmp_path / "records", results=tmp_path / "results.md")


def put(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def fake_student(mod, run: str, val: float, test: float, wall: float = 60.0, planned: bool = False) -> None:
    """A student run's records; ``planned``: recorded with the command the runner plans for it now."""
    put(mod.records / run / "metrics.json", {"val_top1": val})
    put(mod.records / "eval" / f"{run}_test" / "report.json", {"top1": test, "views": "centre crop",
                                                                     "n_images": 10000})
    recipe, seed = run.rsplit("_s", 1)
    argv = mod.student("DATA", recipe, int(seed))[0].argv if planned else [run]
    for step, command in ((run, argv), (f"eval_{run}_test", [f"eval_{run}_test"])):
        put(mod.records / "steps" / f"{step}.json", {"name": step, "argv": ["raypipe", *command], "rc": 0,
                                                  "wall_s": wall, "machine": "test box"})


def test_every_step_is_a_valid_command_with_a_valid_config(repro):
    names = [s.name for s in repro.known_steps("DATA")]
    assert names[:2] == ["probe_random", f"pretrain_{cifar10_50.MAIN_TEACHER}"]   # the baseline of every teacher's gain
    at = names.index("finetune_s0")
    assert names[at:at + 3] == ["finetune_s0", "eval_finetune_s0_test", "eval_finetune_s0_final_test"]   # both rules
    assert "tricks_s0" not in names   # its stage waits for the lambda decision
    finetune = [s for s in repro.known_steps("DATA") if s.name == "finetune_s0"][0]
    assert "student.export_final=true" in finetune.argv
    fake_student(repro, "distill_s0", 42.0, 43.0)
    fake_student(repro, "distill_l1e-4_s0", 44.0, 45.0)   # lambda 1e-4 wins on val
    fake_student(repro, "tricks_s0", 40.0, 41.0)           # on another lambda (another command): not counted
    names = [s.name for s in repro.known_steps("DATA")]
    # the 10-crop stage waits for the tricks decision; the stages after it that do not need it are planned
    assert repro.tricks_val() is None and not any("10crop" in n for n in names)
    assert "probe_m0_k480_e40" in names and "supervised_budget_s0" in names
    fake_student(repro, "tricks_s0", 40.0, 41.0, planned=True)   # on the chosen lambda: tricks lose on val
    names = [s.name for s in repro.known_steps("DATA")]
    assert "eval_distill_l1e-4_s0_10crop_test" in names and not any(n.startswith("eval_ensemble") for n in names)
    put(repro.records / "eval" / "distill_l1e-4_s0_10crop_val" / "report.json", {"top1": 45.0})  # 10-crop helps
    steps = repro.known_steps("DATA")
    names = [s.name for s in steps]
    assert len(names) == len(set(names))
    assert {f"{r}_s{s}" for r in ("supervised", "distill_l1e-4") for s in cifar10_50.SEEDS} <= set(names)
    assert "distill_s1" not in names and "tricks_s1" not in names
    assert {"pretrain_m0_k128_s1", "s1_distill_s0", "s1_distill_l2.5e-5_s0", "s1_supervised_s0",
            *(f"supervised_budget_s{s}" for s in cifar10_50.SEEDS),
            *(f"eval_supervised_budget_s{s}_final_test" for s in cifar10_50.SEEDS)} <= set(names)
    teacher_arch = {}  # teacher file -> the architecture its pretrain step trains
    for step in steps:
        args = build_parser().parse_args(step.argv)
        cfg = _load(args)  # config files exist and validate
        assert cfg.data.root == "DATA" and cfg.data.resolution == 32
        if step.argv[0] == "pretrain":
            teacher_arch[str(repro.teacher_file(step.argv[step.argv.index("--name") + 1][len("teacher_"):]))] = \
                arch_of(cfg.teacher)
        if step.argv[0] == "distill":
            assert (args.teacher is None) == (cfg.student.mode == "supervised")
            assert cfg.student.seed == int(step.name.rsplit("_s", 1)[1])
            if step.name.startswith("tricks"):  # the tricks sit on the val-chosen lambda
                assert cfg.student.ofd.distill_weight == 1e-4 and cfg.student.autoaugment == "cifar10"
            if args.teacher:  # each student is paired with a teacher of its own architecture
                assert teacher_arch[args.teacher] == arch_of(cfg.student), step.name
    assert teacher_arch[str(repro.teacher_file("m0_k128_s1"))]["stem_stride"] == 1
    ensemble = [s for s in steps if s.name == "eval_ensemble_test"][0]
    assert ensemble.argv.count("--model") == 2 and "distill_l1e-4_s1" in " ".join(ensemble.argv)
    assert "distill_l1e-4_s0" in " ".join(ensemble.argv)  # tricks lost on val: plain distillation x2
    assert "--ten-crop" in ensemble.argv
    # a step counts as done only for the command it was run with
    repro.runs.joinpath("eval", "ensemble_test").mkdir(parents=True)
    repro.runs.joinpath("eval", "ensemble_test", "report.json").write_text("{}")
    put(repro.kept(repro.record_path(ensemble)), {"rc": 0, "argv": ["raypipe", *ensemble.argv]})
    assert repro.is_done(ensemble)
    put(repro.kept(repro.record_path(ensemble)), {"rc": 0, "argv": ["raypipe", *ensemble.argv[:-1]]})
    assert not repro.is_done(ensemble)


def test_a_stage_waiting_for_a_decision_does_not_hold_up_the_steps_asked_for_after_it(repro, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(repro, "run_step", lambda step: ran.append(step.name))
    # nothing recorded: the lambda decision waits, so do the stages that need it; the budget rows do not
    repro.run_stages("DATA", {"supervised_budget_s1", "eval_supervised_budget_s1_final_test", "tricks_s0"})
    assert ran == ["supervised_budget_s1", "eval_supervised_budget_s1_final_test"]
    out = capsys.readouterr().out
    assert "skipping stage_seeds: the lambda decision needs" in out and "skipping stage_ensemble" in out


def test_table_statistics_and_val_decisions(repro):
    repro.results.write_text(f"# Results\n\nhand-written intro\n\n{repro.BEGIN}\nold\n{repro.END}\n\nDiscussion.\n")
    for seed, (val, test) in enumerate([(30, 31), (32, 33), (34, 35)]):
        fake_student(repro, f"supervised_s{seed}", val, test)
    for seed, (val, test) in enumerate([(40, 41), (42, 43), (44, 48)]):
        fake_student(repro, f"distill_s{seed}", val, test)
    for seed, (sup, dis) in enumerate([(30.0, 40.0), (31.0, 43.0)]):   # the last epochs' tests, seeds 0 and 1 only
        put(repro.records / "eval" / f"supervised_s{seed}_final_test" / "report.json", {"top1": sup, "n_images": 10000})
        put(repro.records / "eval" / f"distill_s{seed}_final_test" / "report.json", {"top1": dis, "n_images": 10000})
    fake_student(repro, "distill_l1e-4_s0", 39.0, 50.0)  # loses on val: its test number must not matter
    fake_student(repro, "tricks_s0", 45.0, 46.0, planned=True)  # beats distill_s0 on val: kept
    put(repro.records / "eval" / "tricks_s0_10crop_val" / "report.json", {"top1": 44.5})  # worse on val
    put(repro.records / "eval" / "ensemble_val" / "report.json", {"top1": 47.0, "views": "centre crop"})
    put(repro.records / "eval" / "ensemble_test" / "report.json", {"top1": 49.0, "n_images": 9999})
    assert repro.chosen_distill() == "distill"
    assert repro.chain_recipe() == "tricks" and not repro.ten_crop_helps("tricks")
    steps = repro.known_steps("DATA")
    assert not any("--ten-crop" in s.argv for s in steps if s.name.startswith("eval_ensemble"))
    for seed, test in enumerate((40.0, 41.0, 42.0)):
        fake_student(repro, f"supervised_budget_s{seed}", 38.0, test)
    tin = repro.records.parent / "tinyimagenet_50"   # Tiny ImageNet's records, beside these
    for run, val, test in (("distill_s0", 20.0, 16.0), ("distill_s1", 20.0, 17.0), ("distill_l1e-5_s0", 19.0, 30.0),
                           ("supervised_budget_s0", 19.0, 19.5)):
        put(tin / run / "metrics.json", {"val_top1": val})
        put(tin / "eval" / f"{run}_test" / "report.json", {"top1": test})
    fake_student(repro, "s1_supervised_s0", 36.0, 37.5)
    fake_student(repro, "s1_distill_s0", 37.0, 40.0)
    fake_student(repro, "s1_distill_l2.5e-5_s0", 39.0, 39.0)  # wins on val: the gap uses it
    steps = repro.known_steps("DATA")  # now the stride-1 lambda is decided: its second seed is planned
    second = [s for s in steps if s.name.endswith("_s1") and s.name.startswith("s1_")]
    assert [s.name for s in second] == ["s1_supervised_s1", "s1_distill_l2.5e-5_s1"]
    assert second[1].argv[second[1].argv.index("--teacher") + 1] == str(repro.teacher_file("m0_k128_s1"))
    fake_student(repro, "s1_supervised_s1", 36.0, 38.5)
    fake_student(repro, "s1_distill_l2.5e-5_s1", 40.0, 42.0)
    put(repro.kept(repro.probe_file("random")), {"val_knn_top1": 21.0, "test_knn_top1": 20.0, "val_top1": 25.0,
                                                  "test_top1": 24.0})
    put(repro.kept(repro.probe_file(cifar10_50.MAIN_TEACHER)), {"val_knn_top1": 30.0, "test_knn_top1": 32.5,
                                                            "val_top1": 35.0, "test_top1": 34.0})
    put(repro.kept(repro.probe_file("m0_k480_e40")), {"val_knn_top1": 28.0, "test_knn_top1": 27.0})
    repro.write_table(steps)
    doc = repro.results.read_text()
    rows = {line.split("|")[1].strip(): line for line in doc.splitlines() if line.startswith("|")}
    assert rows["supervised from scratch"].endswith("| 41.27 | 27.9 |")   # before the fixes, then the paper
    assert rows["phase 1 + linear probe"].endswith("| 35.00 | 34.00 | - | - | 28.71 | 34.5 |")
    assert rows["gain over random weights"] == "| gain over random weights | +9.00 | +12.50 | +10.00 | +10.00 |"
    assert rows["0"].startswith("| 0 | 480 |") and "| 27.00 | +7.00 | - | - | 28.93 / 26.33 |" in rows["0"]
    # minus the budget-matched run, paired: 41-40, 43-41, 48-42; Tiny ImageNet's: (16 + 17)/2 - 19.5
    assert ("paired by seed: best-val epoch (the headline rule): **3.00 ± 2.65** (1.00, 2.00, 6.00), seeds 0,1,2; "
            "final epoch: - (not run under this rule yet). Minus supervised trained for 613 epochs") in doc
    assert ("paired by seed: best-val epoch (the headline rule): - (not run under this rule yet); final epoch: - (not "
            "run under this rule yet). Tiny ImageNet-50, the same comparison (its table below; best-val epoch, seed "
            "means of 2 and 1 seed(s)): -3.00.") in doc   # the FLOPs-matched row, not run
    assert "| `supervised_budget.yaml` | 0,1,2 |" in \
        rows["supervised from scratch, 520 epochs (0.85x the FLOPs of phase 1 + phase 2)"]
    # its cost against the teacher + one student of the chosen lambda, by FLOPs ((400 + 60) x 4/3 = 613 epochs)
    # and by the records' wall time (no teacher record here: -)
    assert "the budget row, meant to cost what the teacher + one student cost (0.85x their FLOPs, which 613 " \
           "epochs would match; - their wall time by the records: 1.0 min of training per seed against - + 1.0 min)" in doc
    assert "the FLOPs-matched row (1.00x their FLOPs; - their wall time" in doc   # matched: no "would match"
    assert "(lambda chosen on val) minus supervised: **+2.50 points**" in doc   # (39 + 42)/2 - (37.5 + 38.5)/2
    assert "| 0,1 | **36.00 ± 0.00** (36.00, 36.00) | **38.00 ± 0.71** (37.50, 38.50) |" in doc
    assert "lambda 2.5e-5; chosen on val)" in doc and "lambda 1e-4)" in doc
    assert doc.startswith("# Results\n\nhand-written intro") and doc.rstrip().endswith("Discussion.")
    assert "old" not in doc
    assert "images per test report: 9,999, 10,000" in doc        # a short test report shows up
    assert "**33.00 ± 2.00** (31.00, 33.00, 35.00)" in doc        # supervised test: mean ± sample sd
    assert "**44.00 ± 3.61**" in doc                               # distill test 41, 43, 48
    assert "**+11.00 points**" in doc                              # 44 - 33
    # the headline paired by seed under both export rules: best val (41-31, 43-33, 48-35), final (10, 12)
    assert "best-val epoch (the headline rule): **11.00 ± 1.73** (10.00, 10.00, 13.00), seeds 0,1,2" in doc
    assert "final epoch: **11.00 ± 1.41** (10.00, 12.00), seeds 0,1" in doc
    assert "| **41.50 ± 2.12** (40.00, 43.00) | 39.26 | 44.6 |" in doc   # distill's final-epoch test cell
    rows = {line.split("|")[1].strip(): line for line in doc.splitlines() if line.startswith("| +")}
    assert "| kept |" in rows["+ AutoAugment (CIFAR-10 policy) + label smoothing 0.1"]
    assert "| dropped |" in rows["+ 10-crop test"]
    assert "| kept |" in rows["+ ensemble of two models (centre crop)"]
    ensemble = [s for s in steps if s.name == "eval_ensemble_test"][0]
    assert "tricks_s0" in " ".join(ensemble.argv) and "distill_s1" in " ".join(ensemble.argv)
    repro.write_table(steps)  # regenerating is idempotent
    assert repro.results.read_text() == doc


def test_teacher_study_steps_are_valid_commands_and_its_table_reads_the_probes(repro):
    from raypipe.config import parse_args_with_overrides as parse_args
    study = teacher_study.TeacherStudy(runs=repro.runs, records=repro.records, results=repro.results)  # tmp_path
    epochs = {}
    for step in study.steps("DATA"):
        args = parse_args(build_parser(), step.argv)
        cfg = _load(args)
        assert cfg.data.root == "DATA" and cfg.teacher.stem_stride == 2
        if step.argv[0] == "pretrain":
            epochs[args.name] = cfg.teacher.epochs
        else:  # every probe picks its lr on val and reports test
            assert args.split == ["val", "test"] and (args.random_init or args.teacher)
    name = {arm: teacher_study.arm_step(arm)[0] for arm in teacher_study.ARMS}
    expected = {f"teacher_{name[arm]}": next((int(o.split("=")[1]) for o in overrides if o.startswith("teacher.epochs=")),
                                             100)
                for arm, overrides in teacher_study.ARMS.items()}   # base.yaml's 100 unless an arm overrides it
    assert epochs == expected and expected["teacher_study_e400"] == 400
    # a choice recipe's commands (teacher.yaml for the one in use) resolve to its arm's recipe: base.yaml + the
    # arm's overrides; teacher.yaml holds the recipe in use and no other
    configs = REPO / "experiments/configs/cifar10_50"
    for recipe, (_, arm) in teacher_study.CHOICE.items():
        config, overrides = teacher_study.recipe_config(recipe)
        theirs, mine = load_config(configs / config, overrides), load_config(configs / "base.yaml", teacher_study.ARMS[arm])
        assert theirs.to_dict() == mine.to_dict()
        assert (load_config(configs / "teacher.yaml").to_dict() == mine.to_dict()) == (recipe == teacher_study.IN_USE)
    assert cifar10_50.MAIN_TEACHER == teacher_study.CHOICE[teacher_study.IN_USE][0]
    put(repro.kept(repro.probe_file("random")), {"val_knn_top1": 21.0, "test_knn_top1": 20.0,
                                                 "val_top1": 20.0, "test_top1": 19.0, "probe_lr": 1.0})
    put(repro.kept(repro.probe_file("study_e400")), {"val_knn_top1": 40.5, "test_knn_top1": 39.0, "val_top1": 41.0,
                                         "test_top1": 40.0, "probe_lr": 10.0})
    study.write_table()
    row = [line for line in repro.results.read_text().splitlines() if line.startswith("| `study_e400`")][0]
    assert "| 40.50 | 19.50 | 39.00 | 19.00 | 41.00 | 40.00 | 10.0 |" in row   # k-NN, gain over random, ...
    random_row = [line for line in repro.results.read_text().splitlines() if line.startswith("| random")][0]
    assert "| 21.00 | - | 20.00 | - | 20.00 | 19.00 |" in random_row


def test_tinyimagenet_runner_steps_and_table(tmp_path, monkeypatch):
    """experiments/tinyimagenet_50.py: valid commands on its own configs (200 classes' recipe), its
    steps recorded under its own folder, and a table with the gaps and the teacher's gain."""
    from raypipe.config import parse_args_with_overrides as parse_args
    monkeypatch.chdir(REPO)
    tiny = tinyimagenet_50.TinyImageNet(runs=tmp_path / "runs", records=tmp_path / "records")
    steps = tiny.steps("DATA")
    names = [s.name for s in steps]
    assert names[:3] == ["probe_random", "pretrain_teacher", "probe_teacher"] and len(names) == len(set(names))
    pilots = [f"pretrain_{pilot}" for pilot in tinyimagenet_50.PILOTS]
    assert names[3:3 + len(pilots)] == pilots                        # the pilots run before any student
    assert {"supervised_s0", "supervised_s1", "distill_s0", "distill_s1", "finetune_s0",
            "supervised_budget_s0", "distill_l1e-5_s0"} <= set(names) and "finetune_s1" not in names
    assert "distill_l1e-5_s1" not in names       # the second seed waits for the lambda check on val
    resolution = {}
    for step in steps:
        cfg = _load(parse_args(build_parser(), step.argv))
        assert cfg.data.root == "DATA" and cfg.output_dir == "runs/tinyimagenet_50"
        if step.argv[0] == "distill":
            assert ("--teacher" in step.argv) == (cfg.student.mode != "supervised")
            assert arch_of(cfg.student) == arch_of(cfg.teacher)
        if step.name in pilots:
            assert cfg.teacher.epochs == 10 and step.argv[-2:] == ["--name", step.name.replace("pretrain_", "teacher_")]
        resolution[step.name] = cfg.data.resolution
    for pilot in tinyimagenet_50.PROBED_PILOTS:   # a pilot and its random baseline are probed at the pilot's resolution
        assert resolution[f"probe_{pilot}"] == resolution[f"probe_random_{pilot}"] == resolution[f"pretrain_{pilot}"]
    assert resolution["pretrain_pilot_e10_64px"] == 64 and resolution["probe_random"] == 32
    assert tiny.record_path(steps[0]).parent == tmp_path / "runs" / "steps"  # not the CIFAR runner's folder
    for seed, (sup, dis) in enumerate([(20.0, 30.0), (22.0, 34.0)]):
        for recipe, test in (("supervised", sup), ("distill", dis)):
            put(tiny.records / f"{recipe}_s{seed}" / "metrics.json", {"val_top1": test - 1})
            put(tiny.records / "eval" / f"{recipe}_s{seed}_test" / "report.json", {"top1": test})
    put(tiny.records / "eval" / "supervised_budget_s0_test" / "report.json", {"top1": 25.0})
    put(tiny.records / "supervised_budget_s0" / "metrics.json", {"val_top1": 24.0})
    put(tiny.kept(tiny.probe_file("random")), {"val_knn_top1": 5.0, "test_knn_top1": 4.0, "val_top1": 6.0,
                                              "test_top1": 5.5})
    put(tiny.kept(tiny.probe_file("teacher")), {"val_knn_top1": 12.5, "test_knn_top1": 11.0, "val_top1": 15.0,
                                               "test_top1": 14.0})
    (tiny.records / "teacher_pilot_e10_m0").mkdir(parents=True)
    (tiny.records / "teacher_pilot_e10_m0" / "metrics.csv").write_text("epoch,knn_top1\n0,\n4,3.0\n9,4.5\n")
    doc = tiny.table(steps)
    assert "| `pilot_e10_m0` | teacher.epochs=10 teacher.moco.margin=0 | 5:3.0 10:4.5 |" in doc
    assert "| `pilot_e10` | teacher.epochs=10 | - |" in doc                  # not run yet
    assert "Lambda chosen on val (seed 0, 1e-4 vs 1e-5): **1e-4** (the default, until both have run)" in doc
    assert "minus supervised (test, seed means): **+11.00 points**" in doc     # 32 - 21
    assert "minus the budget-matched supervised run: **+7.00 points**" in doc  # 32 - 25
    # the lambda check: 1e-5 wins on val (30 > 29) although its test is lower; it gets the second seed
    # and the gap, 1e-4's better test does not count
    put(tiny.records / "distill_l1e-5_s0" / "metrics.json", {"val_top1": 30.0})
    put(tiny.records / "eval" / "distill_l1e-5_s0_test" / "report.json", {"top1": 27.0})
    assert [s.name for s in tiny.steps("DATA")][-2:] == ["distill_l1e-5_s1", "eval_distill_l1e-5_s1_test"]
    doc = tiny.table(tiny.steps("DATA"))
    assert "Lambda chosen on val (seed 0, 1e-4 vs 1e-5): **1e-5**." in doc
    assert "Phase 1 + phase 2 (lambda 1e-5) minus supervised (test, seed means): **+6.00 points**" in doc  # 27 - 21
    put(tiny.records / "distill_l1e-5_s0" / "metrics.json", {"val_top1": 28.0})   # now 1e-4 wins on val (29)
    assert "distill_l1e-5_s1" not in [s.name for s in tiny.steps("DATA")]
    assert "| gain over random weights | +7.50 | +7.00 | +9.00 | +8.50 |" in doc
    put(tiny.kept(tiny.probe_file("random_pilot_e10_64px")), {"val_knn_top1": 4.0, "test_knn_top1": 3.0,
                                                             "val_top1": 5.0, "test_top1": 4.5})
    put(tiny.kept(tiny.probe_file("pilot_e10_64px")), {"val_knn_top1": 6.0, "test_knn_top1": 5.5,
                                                      "val_top1": 9.0, "test_top1": 8.0})
    doc = tiny.table(steps)
    assert "| `pilot_e10_64px` (10 epochs) | 6.00 | 5.50 | 9.00 | 8.00 |\n| gain over random weights | +2.00 | " \
           "+2.50 | +4.00 | +3.50 |" in doc
    assert "**21.00 ± 1.41** (20.00, 22.00)" in doc


def test_records_outlive_the_run_folder_and_finished_steps_rerun_only_when_needed(repro, tmp_path):
    """The tables and the resume read the committed records, not runs/ (which a new machine lacks)."""
    import shutil
    demo = repro.runs / "demo"
    step = Step("demo", ["demo-data", str(demo), "--train", "1", "--val", "1", "--test", "1", "--size", "8"],
                demo / "train")
    (repro.runs / "teacher_t" / "local_checkpoints").mkdir(parents=True)
    (repro.runs / "teacher_t" / "teacher.pt").write_bytes(b"model")
    (repro.runs / "teacher_t" / "local_checkpoints" / "state.pt").write_bytes(b"state")
    (repro.runs / "teacher_t" / "metrics.csv").write_text("epoch,knn_top1\n4,30.0\n9,33.5\n")
    put(repro.runs / "teacher_t" / "probe.json", {"val_top1": 40.0})
    report = {"split": "test", "models": ["m.pt"], "views": "centre crop", "n_images": 3, "top1": 100 / 3,
              "top5": 100.0, "per_class_top1": {"a": 50.0, "b": 0.0}, "confusion": [[1, 1], [0, 1]]}
    put(repro.runs / "eval" / "x_test" / "report.json", report)
    repro.run_step(step)   # a real raypipe command; its record and the small files of runs/ are kept
    kept = {p.relative_to(repro.records).as_posix() for p in repro.records.rglob("*") if p.is_file()}
    # no model, no checkpoint
    assert kept == {"steps/demo.json", "teacher_t/metrics.csv", "teacher_t/probe.json", "eval/x_test/report.json"}
    # an eval report is kept without its per-class data, its numbers unchanged
    trimmed = {k: v for k, v in report.items() if k not in ("per_class_top1", "confusion")}
    assert repro.load(repro.runs / "eval" / "x_test" / "report.json") == trimmed
    shutil.rmtree(repro.runs)  # a new machine: no models, no run folders
    assert repro.succeeded(step) and repro.load(repro.runs / "teacher_t" / "probe.json") == {"val_top1": 40.0}
    assert repro.knn_curve("t") == "5:30.0 10:33.5"
    assert "raypipe demo-data" in "\n".join(repro.commands_block([step]))

    teacher = Step("pretrain_t", ["pretrain", "D", "--name", "teacher_t"], repro.teacher_file("t"))
    student = Step("s_s0", ["distill", "D", "--teacher", str(repro.teacher_file("t"))], repro.student_file("s_s0"))
    evaluate = repro.evaluate("D", "s_s0_test", ["s_s0"], "test")
    later = Step("s_s1", ["distill", "D", "--teacher", str(repro.teacher_file("t"))], repro.student_file("s_s1"))
    for done in (teacher, student, evaluate):
        put(repro.kept(repro.record_path(done)), {"rc": 0, "argv": ["raypipe", *done.argv]})
    put(repro.kept(evaluate.output), {"top1": 50.0})
    assert repro.is_done(evaluate) and repro.is_done(student, [evaluate])   # its only user has run
    assert repro.is_done(teacher, [student, evaluate])
    assert not repro.is_done(teacher, [student, evaluate, later])   # a student still to train needs it


def test_a_step_rerun_after_an_unfinished_attempt_counts_both_attempts_and_keeps_their_log(repro):
    """A long step is resumed from its checkpoint in a later sitting: its record's wall time is that
    of all its attempts (the budget-matched baseline is sized by it) and its log keeps the first."""
    import time
    blocker = repro.runs / "demo"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the step writes a folder")   # the first attempt fails
    step = Step("demo", ["demo-data", str(blocker / "data"), "--train", "1", "--val", "1", "--test", "1",
                         "--size", "8"], blocker / "data" / "train")
    t0 = time.time()
    with pytest.raises(SystemExit, match="failed with exit code"):
        repro.run_step(step)
    first_s = time.time() - t0
    assert not repro.succeeded(step)
    blocker.unlink()
    t0 = time.time()
    repro.run_step(step)
    second_s = time.time() - t0
    rec = repro.load(repro.record_path(step))
    assert repro.succeeded(step) and rec["attempts"] == 2
    assert second_s + 0.5 * first_s < rec["wall_s"] <= second_s + first_s + 1
    log = (repro.runs / "logs" / "demo.log").read_text()
    assert "attempt 1" in log and "Not a directory" in log and "attempt 2" in log
    assert not repro.attempt_path(step).exists()
    repro.run_step(step)   # a finished step run again starts afresh
    assert repro.load(repro.record_path(step))["attempts"] == 1
    assert "Not a directory" not in (repro.runs / "logs" / "demo.log").read_text()


def test_table_is_not_rewritten_when_records_are_missing(repro):
    old = "raypipe pretrain D --name teacher_t"
    repro.results.write_text(f"# R\n\n{repro.BEGIN}\n```\n{old}\n```\n{repro.END}\ntail\n")
    with pytest.raises(SystemExit, match="drop 1 recorded command"):
        repro.write_block(f"{repro.BEGIN}\nnothing recorded\n{repro.END}")
    assert old in repro.results.read_text()
    repro.write_block(f"{repro.BEGIN}\n```\n{old}   # pretrain_t: 3.0 min, exit 0\n```\n{repro.END}")
    assert repro.results.read_text().endswith("exit 0\n```\n<!-- results:end -->\ntail\n")


def test_a_gone_model_is_remade_by_its_step_before_a_step_that_reads_it(repro):
    """Models are not kept in the records: on a new machine (no runs/) a finished step whose model a
    step still to run reads runs again first (an earlier stage's too); with --only, the run stops and
    names it unless it was asked for."""
    import shutil
    made = repro.runs / "made"
    maker = Step("make", ["demo-data", str(made), "--train", "1", "--val", "1", "--test", "1", "--size", "8"],
                 made / "train")   # stands for a pretrain step: its output is the model
    reader = Step("read", ["demo-data", str(maker.output), "--train", "1", "--val", "1", "--test", "1", "--size",
                           "8"], made / "train" / "train")   # stands for a student: it reads the maker's output
    repro.run_step(maker)
    shutil.rmtree(repro.runs)   # a new machine
    assert repro.succeeded(maker) and not repro.is_done(maker, [reader])
    with pytest.raises(SystemExit, match="add step make to --only"):
        repro.run_all([reader], {"read"}, earlier=[maker])
    with pytest.raises(SystemExit, match="add step make to --only"):
        repro.run_all([maker, reader], {"read"})
    assert not maker.output.exists() and not repro.succeeded(reader)
    repro.run_all([maker, reader], {"make", "read"})   # asked for: re-made, then read
    assert maker.output.is_dir() and repro.succeeded(reader)
    shutil.rmtree(repro.runs)
    repro.kept(repro.record_path(reader)).unlink()      # the reader still to run, in a later stage
    repro.run_all([reader], None, earlier=[maker])      # an earlier stage's step is re-made too
    assert maker.output.is_dir() and repro.record_path(maker).is_file() and repro.succeeded(reader)


def test_a_step_that_read_a_since_remade_input_is_stale_until_it_runs_again(repro):
    """Re-making a teacher (or a student) makes the steps that read its earlier make stale: they are not
    done (a run, with --only too, runs them again) and the command list marks them until then."""
    teacher = Step("pretrain_t", ["pretrain", "D", "--name", "teacher_t"], repro.teacher_file("t"))
    student = Step("s_s0", ["distill", "D", "--teacher", str(repro.teacher_file("t"))], repro.student_file("s_s0"))
    evaluate = repro.evaluate("D", "s_s0_test", ["s_s0"], "test")
    other = Step("o_s0", ["distill", "D"], repro.student_file("o_s0"))   # reads no teacher

    def record(step, started):
        put(repro.kept(repro.record_path(step)), {"name": step.name, "argv": ["raypipe", *step.argv], "rc": 0,
                                                 "wall_s": 60.0, "started": started})

    for step, started in ((teacher, "2026-11-30T10:00:00+00:00"), (student, "2026-11-30T11:00:00+00:00"),
                          (evaluate, "2026-11-30T12:00:00+00:00"), (other, "2026-11-30T09:00:00+00:00")):
        record(step, started)
    put(repro.kept(evaluate.output), {"top1": 50.0})
    steps = [teacher, other, student, evaluate]
    assert all(repro.is_done(s, [], steps[:i]) for i, s in enumerate(steps) if s is not teacher)
    record(teacher, "2026-12-06T07:33:55+00:00")   # the teacher is made again
    assert repro.remade_inputs(student, steps[:2]) == [teacher]
    assert not repro.is_done(student, [], steps[:2])
    assert repro.is_done(other, [], steps[:1])            # did not read it
    assert repro.is_done(evaluate, [], steps[:3])         # read the student, which has not been re-made yet
    lines = repro.commands_block(steps)
    assert [("STALE: made from an earlier pretrain_t" in line) for line in lines] == [False, False, True, False]
    record(student, "2026-12-06T08:00:00+00:00")   # the student runs again: now its eval is stale
    assert repro.is_done(student, [], steps[:2]) and not repro.is_done(evaluate, [], steps[:3])
    assert "STALE: made from an earlier s_s0" in repro.commands_block(steps)[3]


def test_teacher_choice_runs_both_recipes_with_two_seeds_and_picks_on_mean_linear_val(repro):
    from raypipe.config import parse_args_with_overrides as parse_args
    choice = teacher_study.TeacherChoice(runs=repro.runs, records=repro.records, results=repro.results)
    study = teacher_study.TeacherStudy(runs=repro.runs, records=repro.records, results=repro.results)
    steps = choice.steps("DATA")
    assert len(steps) == 2 * len(teacher_study.CHOICE) * len(teacher_study.CHOICE_SEEDS)
    by_name = {s.name: s for s in steps}
    # seed 0 of each recipe is the very step the CIFAR runner / the study already has (not trained twice)
    for shared in [*repro.pretrain("DATA", cifar10_50.MAIN_TEACHER),
                   *[s for s in study.steps("DATA") if s.name.endswith("_study_e400")]]:
        assert by_name[shared.name] == shared
    cfgs = {}
    for step in steps:
        if step.argv[0] == "pretrain":
            args = parse_args(build_parser(), step.argv)
            cfgs[args.name] = _load(args).teacher
    assert {n: (c.seed, c.epochs) for n, c in cfgs.items()} == {
        "teacher_study_e400": (0, 400), "teacher_m0.4_k128_t0.1_e400": (0, 400),
        "teacher_study_e400_seed1": (1, 400), "teacher_m0.4_k128_t0.1_e400_seed1": (1, 400)}
    dump = {n: c.model_dump() if hasattr(c, "model_dump") else vars(c) for n, c in cfgs.items()}
    assert dump["teacher_study_e400_seed1"] == {**dump["teacher_study_e400"], "seed": 1}   # one change: the seed
    assert dump["teacher_m0.4_k128_t0.1_e400_seed1"] == {**dump["teacher_m0.4_k128_t0.1_e400"], "seed": 1}
    assert dump["teacher_study_e400"] != dump["teacher_m0.4_k128_t0.1_e400"]

    repro.results.write_text(f"# S\n\n{choice.BEGIN}\n{choice.END}\n")
    assert choice.winner()[0] is None
    for name, val in (("study_e400", 36.0), ("study_e400_seed1", 38.0), ("m0.4_k128_t0.1_e400", 39.0)):
        put(repro.kept(repro.probe_file(name)), {"val_top1": val, "test_top1": val - 1, "probe_lr": 1.0,
                                                 "probe_lr_at_edge": False,
                                                 "probe_val_top1_by_lr": {"0.1": 30.0, "1.0": val, "10.0": 31.0}})
    choice.write_block(choice.block())
    assert "Not decided yet: probes missing for m0.4_k128_t0.1_e400_seed1" in repro.results.read_text()
    put(repro.kept(repro.probe_file("m0.4_k128_t0.1_e400_seed1")), {"val_top1": 34.0, "test_top1": 33.0})
    assert choice.winner() == ("t0.2_blur", {"t0.2_blur": [36.0, 38.0], "t0.1_noblur": [39.0, 34.0]})
    choice.write_block(choice.block())
    doc = repro.results.read_text()
    assert ("Chosen on mean linear val: **t0.2_blur** (t0.2_blur 37.00 vs t0.1_noblur 36.50: +0.50, against a sd "
            "between seeds of up to 3.54 within a recipe; the rule decides, the seeds do not separate the recipes).") in doc
    assert "teacher.yaml holds t0.1_noblur: it must change" in doc
    assert "| **t0.2_blur: mean ± sd** | | 2 |" in doc and "1.0 (0.1/1/10; inside)" in doc
    put(repro.kept(repro.probe_file("m0.4_k128_t0.1_e400_seed1")), {"val_top1": 36.0})
    assert choice.winner()[0] == "t0.1_noblur"


def test_a_changed_teacher_choice_keeps_the_runs_of_both_recipes(repro, monkeypatch):
    """When the choice picks the other recipe, its commands move to teacher.yaml and the former one's to
    base.yaml + overrides: the runs made in either form stay done (the engine knows a run by the config it
    wrote), unless teacher.yaml has not been given the new recipe (then its run is stale)."""
    choice = teacher_study.TeacherChoice(runs=repro.runs, records=repro.records, results=repro.results)

    def record(step):
        put(repro.kept(repro.record_path(step)), {"name": step.name, "argv": ["raypipe", *step.argv], "rc": 0})
        args = build_parser().parse_args(step.argv[:2] + step.argv[step.argv.index("--config"):])
        overrides = step.argv[2:step.argv.index("--config")]
        cfg = load_config(args.config, [*overrides, f"name={args.name}", "data.root=DATA"])
        repro.kept(repro.runs / args.name / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
        cfg.dump(repro.kept(repro.runs / args.name / "config.yaml"))

    made = [s for s in choice.steps("DATA") if s.argv[0] == "pretrain"]
    for step in made:
        record(step)
    assert all(choice.succeeded(s) for s in made)
    other = next(r for r in teacher_study.CHOICE if r != teacher_study.IN_USE)
    monkeypatch.setattr(teacher_study, "IN_USE", other)   # the choice changed; teacher.yaml not yet
    moved = {s.name: s for s in choice.steps("DATA") if s.argv[0] == "pretrain"}
    assert {n: s.argv for n, s in moved.items()} != {s.name: s.argv for s in made}   # commands rewritten
    for name, step in moved.items():
        in_use = "experiments/configs/cifar10_50/teacher.yaml" in step.argv
        assert in_use == name.startswith(f"pretrain_{teacher_study.CHOICE[other][0]}")
        assert choice.succeeded(step) != in_use, name   # teacher.yaml still holds the former recipe: stale


def test_a_rerun_step_is_not_a_dropped_record_and_steps_out_of_the_plan_stay_listed(repro):
    """A step run again with another command (its record replaced) does not block rewriting the table; a
    recorded step a changed val decision took out of the plan stays in the command list, marked."""
    from experiments.steps import dropped_commands
    old = "```\nraypipe distill D --name s_s0   # s_s0: 1.0 min, exit 0\nraypipe distill D --name o_s1   # o_s1: 1.0 min, exit 0\n```"
    rerun = "```\nraypipe distill D x=1 --name s_s0   # s_s0: 2.0 min, exit 0\nraypipe distill D --name o_s1   # o_s1: 1.0 min, exit 0\n```"
    assert dropped_commands(old, rerun) == []
    assert dropped_commands(old, "```\nraypipe distill D x=1 --name s_s0   # s_s0: 2.0 min, exit 0\n```") == \
        ["raypipe distill D --name o_s1"]
    planned = Step("s_s0", ["distill", "D", "x=1", "--name", "s_s0"], repro.student_file("s_s0"))
    for name, argv, started in (("o_s1", ["distill", "D", "--name", "o_s1"], "2026-11-30T10:00:00+00:00"),
                                ("s_s0", planned.argv, "2026-12-06T10:00:00+00:00"),
                                ("x_s0", ["distill", "D", "--name", "x_s0"], "2026-11-30T09:00:00+00:00")):
        put(repro.kept(repro.record_path(Step(name, argv, Path("-")))),
            {"name": name, "argv": ["raypipe", *argv], "rc": 0, "wall_s": 60.0, "started": started})
    lines = repro.unplanned([planned], exclude={"x_s0"})
    assert lines == ["raypipe distill D --name o_s1   # o_s1: 1.0 min, exit 0; not in the current plan "
                     "(a val decision changed since it ran)"]
    assert dropped_commands(old, "\n".join(["```", *repro.commands_block([planned]), *lines, "```"])) == []


def test_an_edited_config_makes_its_step_stale_and_a_rewritten_command_resolving_alike_does_not(repro, tmp_path):
    """A pretrain/distill step is the config its run wrote (kept config.yaml), not only its command's text:
    editing the config file the command names makes it stale (the keys named); another command resolving
    to the same values (a teacher recipe moved out of the file that held it) is the same run."""
    base = REPO / "experiments" / "configs" / "cifar10_50" / "base.yaml"
    recipe = tmp_path / "teacher.yaml"
    recipe.write_text(f"extends: {base}\nteacher:\n  epochs: 400\n")
    step = Step("pretrain_t", ["pretrain", "D", "teacher.seed=1", "--config", str(recipe), "--name", "teacher_t"],
                repro.teacher_file("t"))
    put(repro.kept(repro.record_path(step)), {"name": step.name, "argv": ["raypipe", *step.argv], "rc": 0,
                                              "wall_s": 60.0})
    ran = load_config(recipe, ["teacher.seed=1", "name=teacher_t", "data.root=D"])
    repro.kept(repro.runs / "teacher_t" / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
    ran.dump(repro.kept(repro.runs / "teacher_t" / "config.yaml"))
    assert repro.config_changes(step) == {} and repro.succeeded(step)

    recipe.write_text(f"extends: {base}\nteacher:\n  epochs: 400\n  moco:\n    temperature: 0.1\n")   # edited
    assert repro.config_changes(step) == {"teacher.moco.temperature": (0.2, 0.1)}
    assert not repro.succeeded(step) and not repro.is_done(step)
    assert "STALE: its config changed since it ran: teacher.moco.temperature 0.2 -> 0.1" in \
        repro.commands_block([step])[0]

    # the recipe as base.yaml + overrides (the file now holds another): the same run, done
    moved = Step("pretrain_t", ["pretrain", "D", "teacher.epochs=400", "teacher.seed=1", "--config", str(base),
                                "--name", "teacher_t"], repro.teacher_file("t"))
    assert repro.succeeded(moved)
    for other in (["pretrain", "D", "teacher.epochs=400", "--config", str(base), "--name", "teacher_t"],  # seed 0
                  ["pretrain", "D", "teacher.epochs=400", "teacher.seed=1", "--config", str(base), "--name",
                   "teacher_u"],                                                        # another run's name
                  ["pretrain", "E", "teacher.epochs=400", "teacher.seed=1", "--config", str(base), "--name",
                   "teacher_t"]):                                                       # other data
        assert not repro.succeeded(Step("pretrain_t", other, repro.teacher_file("t"))), other
        # the table's cells are still the recorded run's: its command line says the plan runs it again
        assert f"STALE: the plan runs it again as: raypipe {' '.join(other)}" in \
            repro.commands_block([Step("pretrain_t", other, repro.teacher_file("t"))])[0]
    assert "STALE" not in repro.commands_block([moved])[0]
    recipe.unlink()   # the config file the recorded command names is gone: it no longer resolves, not done
    assert "does not resolve now" in repro.config_changes(step)["--config"][1] and not repro.succeeded(step)


def test_the_flops_matched_row_costs_what_the_teacher_and_a_student_cost(repro):
    """(teacher epochs + student epochs) x 4/3 supervised epochs (a MoCo or distillation epoch: one more
    forward than a supervised one's forward + backward), for every distillation candidate; its runs read
    no teacher."""
    configs = REPO / "experiments" / "configs" / "cifar10_50"
    teacher = load_config(configs / "teacher.yaml").teacher.epochs
    for recipe in cifar10_50.DISTILL_CANDIDATES:
        student = load_config(configs / cifar10_50.RECIPES[recipe]).student.epochs
        assert repro.flops_matched_epochs(recipe) == round((teacher + student) * 4 / 3) == \
            repro.budget_epochs("supervised_flops")
    assert repro.budget_epochs("supervised_budget") < repro.budget_epochs("supervised_flops")
    assert repro.flops_share("supervised_flops") == "1.00x"
    flops = [s for s in repro.known_steps("DATA") if s.name.startswith("supervised_flops_s")]
    assert [s.name for s in flops] == [f"supervised_flops_s{seed}" for seed in cifar10_50.SEEDS]
    assert all("--teacher" not in s.argv and str(configs.relative_to(REPO) / "supervised_flops.yaml") in s.argv
               for s in flops)
