"""What the benchmarks of this folder share to time the phases' real worker loops
(``raypipe.teacher.run`` / ``raypipe.student.run``): phase 1's Ray datasets, made as the phase
runner makes them (``raypipe.phase.run_phase``), a run of a loop on Ray Train's TorchTrainer, and
the images/s of a loop's second epoch in this process.
"""
from __future__ import annotations

from raypipe import registry
from raypipe.data import eval_dataset, with_views
from raypipe.loop import MemorySession
from raypipe.phase import run_location
from raypipe.raytrain import final_state, run_trainer
from raypipe.teacher import method_class


def phase1_datasets(cfg, decoded: dict, on_device: bool = False, premade: bool = False) -> dict:
    """``train`` (the method's views made by Ray Data every epoch; ``on_device``: the decoded images,
    for the loop to make the views; ``premade``: views made once and materialised), and the
    centre-crop ``bank`` and ``val`` of the k-NN monitor."""
    train = with_views(decoded["train"], method_class(cfg).views(cfg), cfg.data, on_device=on_device)
    return {"train": train.materialize() if premade else train, "bank": eval_dataset(decoded["train"], cfg.data),
            "val": eval_dataset(decoded["val"], cfg.data)}


def fit_on_ray_train(cfg, run, meta: dict, datasets: dict) -> list[dict]:
    """The loop ``run`` on Ray Train (``raypipe.raytrain.run_trainer``; its Train run in
    ``output_dir/name``) -> the history of its last checkpoint."""
    loop_config = {"cfg": cfg.to_dict(), "meta": meta, "plugins": registry.snapshot(), "run": run}
    return final_state(run_trainer(cfg, loop_config, datasets, run_location(cfg)))["history"]


def second_epoch_rate(run, cfg, meta: dict, first, second, evaluation: dict, device) -> float:
    """images/s of the second of two epochs of the loop ``run`` over a MemorySession (its own timer:
    from the epoch's start to its last step): ``first()`` and ``second()`` give each epoch's training
    batches (the first warms up); ``evaluation``: the splits its end-of-epoch pass reads (a phase-1
    loop's ``bank`` and ``val``, a phase-2 loop's ``val``). ``cfg``'s phase trains 2 epochs."""
    epochs = iter((first, second))
    session = MemorySession({"train": lambda: next(epochs)(), **evaluation}, device)
    run(cfg, meta, session)
    return session.reports[-1]["images_per_s"]
