"""Locust users for bench/dashboard_load.py: each uploads real cells the two ways a
dashboard server is used — the upload box (the Dash callback request the browser sends)
and ``POST /api/predict`` — and now and then reloads the page.

Cells come from ``MALARIA_BENCH_DATA`` (default ../shared/data/nih-cell-images).
"""

from __future__ import annotations

import base64
import os
import random
from pathlib import Path

from locust import HttpUser, between, task

DATA = Path(os.environ.get("MALARIA_BENCH_DATA", "../shared/data/nih-cell-images"))
CELLS = (
    sorted((DATA / "Parasitized").glob("*.png"))[::97]
    + sorted((DATA / "Uninfected").glob("*.png"))[::97]
)
PAYLOADS = [(path.name, path.read_bytes()) for path in CELLS]


class LabTechnician(HttpUser):
    wait_time = between(0.5, 1.5)

    @task(5)
    def upload_in_dashboard(self) -> None:
        chosen = random.sample(PAYLOADS, k=random.randint(1, 10))
        payload = {
            "output": "results-store.data",
            "outputs": {"id": "results-store", "property": "data"},
            "inputs": [
                {
                    "id": "pending-upload",
                    "property": "data",
                    "value": {
                        "contents": [
                            "data:image/png;base64," + base64.b64encode(data).decode()
                            for _, data in chosen
                        ],
                        "filenames": [name for name, _ in chosen],
                    },
                }
            ],
            "changedPropIds": ["pending-upload.data"],
            "state": [{"id": "show-why", "property": "value", "value": False}],
        }
        with self.client.post(
            "/_dash-update-component", json=payload, name="dash upload", catch_response=True
        ) as response:
            results = response.json()["response"]["results-store"]["data"]
            if len(results) != len(chosen) or not all(result["label"] for result in results):
                response.failure("a cell came back without a label")

    @task(5)
    def api_predict(self) -> None:
        name, data = random.choice(PAYLOADS)
        with self.client.post(
            "/api/predict", files={"file": (name, data)}, name="api predict", catch_response=True
        ) as response:
            if response.json()[0]["label"] not in ("Parasitized", "Uninfected"):
                response.failure("no label")

    @task(1)
    def open_page(self) -> None:
        self.client.get("/", name="page")
        self.client.get("/_dash-layout", name="layout")
