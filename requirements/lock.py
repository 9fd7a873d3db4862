"""Write requirements/cluster.lock from a ``pip install --dry-run --report`` of the project."""
import json
import sys
from pathlib import Path

LOCK = Path(__file__).with_name("cluster.lock")


def main(report_path: str) -> None:
    report = json.loads(Path(report_path).read_text())
    pins = sorted((i["metadata"]["name"].lower(), i["metadata"]["version"]) for i in report["install"]
                  if i["metadata"]["name"] != "raypipe")
    header = [line for line in LOCK.read_text().splitlines() if line.startswith("#")]
    LOCK.write_text("\n".join(header + [""] + [f"{n}=={v}" for n, v in pins]) + "\n")
    print(f"{LOCK}: {len(pins)} pins")


if __name__ == "__main__":
    main(sys.argv[1])
