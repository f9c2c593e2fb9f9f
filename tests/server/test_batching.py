"""Batching and reproducibility: an image depends on its request and seed, not on what it was batched with.

Each image has its own generator, so the noise is the same alone or in a batch. Bit-identical pixels need more:
matmul kernels choose their summation order by batch size, so the last bits of the arithmetic follow the batch.
``--batch-invariant`` runs every pipeline call at ``--max-batch`` images, which makes them identical; without it
the images agree to within one level in a few pixels here (fp32 on the CPU; with fp16 on a GPU, up to a few levels).
"""

from __future__ import annotations

import base64

import numpy as np
from server_harness import FAST, TERMINAL, cancel, pixels, start_blocker


def alone_then_batched(server) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seed 5 of 'a red cat': alone, in a 4-image batch of three requests, and second of a 3-image request."""
    request = {"prompt": "a red cat", "size": "64x64", "seed": 5, **FAST}
    alone = server.request("POST", "/v1/images/generations", request)
    assert alone.status == 200, alone.body
    assert server.request("GET", f"/v1/jobs/{alone.headers['X-Job-Id']}").json()["batch_size"] == 1
    reference = pixels(base64.b64decode(alone.json()["data"][0]["b64_json"]))

    # Queue three compatible requests behind a blocker: the worker then runs them as one call of 4 images.
    blocker = start_blocker(server)
    jobs = [
        {"prompt": "a blue dog", "seed": 9},
        {"prompt": "a red cat", "seed": 5},
        {"prompt": "green fields", "seed": 10, "n": 2},
    ]
    ids = []
    for job in jobs:
        response = server.request("POST", "/v1/jobs", {"width": 64, "height": 64, **FAST, **job})
        assert response.status == 202
        ids.append(response.json()["id"])
    cancel(server, blocker)
    finals = [server.wait(job_id, TERMINAL) for job_id in ids]
    assert [f["status"] for f in finals] == ["succeeded"] * 3
    assert [f["batch_size"] for f in finals] == [4, 4, 4]
    batched = pixels(server.request("GET", f"/v1/jobs/{ids[1]}/images/0.png").body)
    three = server.request("POST", "/v1/images/generations", {**request, "seed": 4, "n": 3})
    second_of_three = pixels(base64.b64decode(three.json()["data"][1]["b64_json"]))
    # The other images are other pictures: the requests did not share noise.
    other = pixels(server.request("GET", f"/v1/jobs/{ids[0]}/images/0.png").body)
    assert np.abs(other.astype(int) - reference).mean() > 10
    return reference, batched, second_of_three


def test_batch_invariant_server_gives_identical_pixels(other_server):
    models = other_server.request("GET", "/v1/models").json()
    assert models["batch_invariant"] is True
    assert models["fast"] is True and models["warm_up"] == ["64x64"]  # the fast path's graphs, padded calls too
    # --compile-cache: the folder is made and the start-up log names it
    assert other_server.compile_cache.is_dir()
    assert any(f"(compile cache: {other_server.compile_cache})" in line for line in other_server.output)
    reference, batched, second_of_three = alone_then_batched(other_server)
    np.testing.assert_array_equal(batched, reference)
    np.testing.assert_array_equal(second_of_three, reference)


def test_default_server_gives_the_same_image_up_to_the_last_bit(server):
    assert server.request("GET", "/v1/models").json()["batch_invariant"] is False
    reference, batched, second_of_three = alone_then_batched(server)
    for image in (batched, second_of_three):
        difference = np.abs(image.astype(int) - reference)
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01
