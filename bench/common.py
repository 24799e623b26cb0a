"""What the benchmarks share: where their results go."""
import json
import os

# FASTCURL_RESULTS moves them (bench/gpu_check.sh points it at the device call's $OUT)
RESULTS = os.environ.get("FASTCURL_RESULTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                             "results")


def save_result(name: str, res: dict, indent: int = 2) -> str:
    """Write `res` as JSON to bench/results/<name> (or $FASTCURL_RESULTS/<name>); returns the path."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump(res, f, indent=indent)
    return path
