"""Fuzz the image decoding and upload path with >= 10,000 hostile inputs; report crashes.

    python bench/fuzz_images.py --cases 10500

Runs the strategies of tests/_fuzz_inputs.py (random bytes, valid images in 12 modes
and 6 formats with EXIF rotations, truncated/flipped/padded files, animated GIFs,
headers claiming huge or zero sizes) through three entry points: decode_image_bytes,
decode_upload (browser data URL) and load_for_model (a file on disk). A crash is any
exception other than ImageLoadError, or an ImageLoadError that does not name its
source; a hang is a case over 10 s (SIGALRM). Peak memory is the process's max RSS.
"""

from __future__ import annotations

import argparse
import base64
import resource
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from _fuzz_inputs import any_upload  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from malaria_classifier.images import (  # noqa: E402
    ImageLoadError,
    decode_image_bytes,
    decode_upload,
    load_for_model,
)

PIXEL_LIMIT = 1_000_000
HANG_SECONDS = 10


class HangError(Exception):
    """A single case ran longer than HANG_SECONDS."""


def _alarm(_signum, _frame):
    raise HangError()


def run_entry_point(name, call, cases, results, folder):
    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(any_upload)
    def fuzz(data):
        results["cases"][name] += 1
        signal.alarm(HANG_SECONDS)
        try:
            image = call(data, folder)
            outcome = "decoded"
            if image.dtype.name != "uint8" or image.ndim != 3 or image.shape[2] != 3:
                outcome = "crash: bad array"
        except ImageLoadError as error:
            outcome = (
                "refused"
                if str(error).startswith(("upload", "up", str(folder)))
                else "crash: unnamed error"
            )
        except HangError:
            outcome = "hang"
        except Exception:  # noqa: BLE001 - anything else is exactly what we look for
            outcome = "crash"
            results["examples"].append((name, traceback.format_exc(limit=3), data[:64]))
        finally:
            signal.alarm(0)
        results["outcomes"][(name, outcome)] += 1

    fuzz()


def from_bytes(data, _folder):
    return decode_image_bytes(data, "upload.bin", PIXEL_LIMIT)


def from_upload(data, _folder):
    return decode_upload(
        "data:image/png;base64," + base64.b64encode(data).decode(), "up", PIXEL_LIMIT
    )


def from_file(data, folder):
    path = Path(folder) / "input.png"
    path.write_bytes(data)
    return load_for_model(path, 64, PIXEL_LIMIT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=10_500, help="total cases over 3 entry points")
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    warnings.simplefilter("ignore")  # Pillow warns about every corrupt EXIF/TIFF tag
    results = {"cases": Counter(), "outcomes": Counter(), "examples": []}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        for name, call in (("bytes", from_bytes), ("upload", from_upload), ("file", from_file)):
            run_entry_point(name, call, args.cases // 3, results, folder)
    seconds = time.monotonic() - started
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total = sum(results["cases"].values())
    crashes = sum(
        n for (_, outcome), n in results["outcomes"].items() if outcome.startswith("crash")
    )
    hangs = sum(n for (_, outcome), n in results["outcomes"].items() if outcome == "hang")
    print(f"cases: {total} ({dict(results['cases'])})")
    for (name, outcome), count in sorted(results["outcomes"].items()):
        print(f"  {name:<7} {outcome:<22} {count}")
    print(f"crashes: {crashes}; hangs (> {HANG_SECONDS} s): {hangs}")
    print(f"time: {seconds:.1f} s ({total / seconds:.0f} cases/s)")
    print(f"peak RSS: {rss_after / 1024:.0f} MiB (before fuzzing {rss_before / 1024:.0f} MiB)")
    for name, trace, head in results["examples"][:5]:
        print(f"--- crash in {name}, input starts {head!r}\n{trace}")
    sys.exit(1 if crashes or hangs else 0)


if __name__ == "__main__":
    main()
