"""Benchmark: dashboard server-side time from upload to result, one cell and 100 cells.

Usage:
    python bench/dashboard_latency.py [--data ../shared/data/nih-cell-images] [--repeats 200]

Sends the same HTTP requests the browser sends after an upload through Flask's test
client (no network): the classify callback (base64 decode, image decode, resize,
predict, PNG of the model's view) and then the render callback (cards, table rows,
summary). Their sum is the server-side time from upload to result. Grad-CAM is measured
off (the issue's target) and on. A same-run baseline, ``Predictor.predict_arrays`` on
the already-decoded cell, shows how much of the time the model itself takes.
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def classify_payload(files: list[Path], show_why: bool) -> dict:
    return {
        "output": "results-store.data",
        "outputs": {"id": "results-store", "property": "data"},
        "inputs": [
            {
                "id": "pending-upload",
                "property": "data",
                "value": {
                    "contents": [data_url(path) for path in files],
                    "filenames": [path.name for path in files],
                },
            }
        ],
        "changedPropIds": ["pending-upload.data"],
        "state": [{"id": "show-why", "property": "value", "value": show_why}],
    }


def render_payload(results: list, show_why: bool) -> dict:
    outputs = [
        ("result-cards", "children"),
        ("result-table", "rowData"),
        ("summary", "children"),
        ("download-button", "disabled"),
    ]
    return {
        "output": ".." + "...".join(f"{name}.{prop}" for name, prop in outputs) + "..",
        "outputs": [{"id": name, "property": prop} for name, prop in outputs],
        "inputs": [
            {"id": "results-store", "property": "data", "value": results},
            {"id": "show-why", "property": "value", "value": show_why},
        ],
        "changedPropIds": ["results-store.data"],
    }


def upload_to_result(client, files: list[Path], show_why: bool) -> float:
    """Seconds for the classify request plus the render request it triggers."""
    started = time.perf_counter()
    response = client.post("/_dash-update-component", json=classify_payload(files, show_why))
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    results = response.get_json()["response"]["results-store"]["data"]
    assert len(results) == len(files) and all(result["label"] for result in results)
    response = client.post("/_dash-update-component", json=render_payload(results, show_why))
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    return time.perf_counter() - started


def percentile(values: list[float], share: float) -> float:
    return float(np.percentile(np.asarray(values), share))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nih-cell-images"))
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--batch-repeats", type=int, default=20)
    args = parser.parse_args()

    from malaria_classifier.dashboard import create_app
    from malaria_classifier.data import find_class_root
    from malaria_classifier.images import load_for_model
    from malaria_classifier.prediction import Predictor

    started = time.perf_counter()
    predictor = Predictor()
    app = create_app(predictor)
    startup = time.perf_counter() - started
    client = app.server.test_client()
    root = find_class_root(args.data)
    cells = (
        sorted((root / "Parasitized").glob("*.png"))[::50][:50]
        + sorted((root / "Uninfected").glob("*.png"))[::50][:50]
    )
    batch = cells[:100]

    single_off = [
        upload_to_result(client, [cells[index % len(cells)]], False)
        for index in range(args.repeats)
    ]
    single_on = [
        upload_to_result(client, [cells[index % len(cells)]], True)
        for index in range(args.repeats // 2)
    ]
    batch_off = [upload_to_result(client, batch, False) for _ in range(args.batch_repeats)]
    batch_on = [upload_to_result(client, batch, True) for _ in range(args.batch_repeats // 2)]
    one_input = load_for_model(cells[0], predictor.image_size)[None]
    model_only = []
    for _ in range(args.repeats):
        tick = time.perf_counter()
        predictor.predict_arrays(one_input)
        model_only.append(time.perf_counter() - tick)

    def row(name: str, values: list[float]) -> dict:
        return {
            "case": name,
            "requests": len(values),
            "median_ms": round(1000 * statistics.median(values), 1),
            "p95_ms": round(1000 * percentile(values, 95), 1),
            "max_ms": round(1000 * max(values), 1),
        }

    report = {
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPU cores",
        "startup_s": round(startup, 2),
        "rows": [
            row("1 cell, Grad-CAM off", single_off),
            row("1 cell, Grad-CAM on", single_on),
            row("100 cells, Grad-CAM off", batch_off),
            row("100 cells, Grad-CAM on", batch_on),
            row("baseline: model forward pass only, 1 cell", model_only),
        ],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
