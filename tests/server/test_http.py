"""End to end: a real ``kandinsky22 serve`` process on tiny checkpoints, over loopback HTTP.

Tests that need queued jobs first start a "blocker" (see conftest), so what queues behind it is known exactly.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json

import numpy as np
import PIL.Image
import pytest
from server_harness import (
    FAST,
    MAX_BATCH,
    MAX_BODY_MB,
    MAX_QUEUE,
    MAX_STEPS,
    b64_png,
    cancel,
    pixels,
    png_image,
    recipe,
    start_blocker,
)

from kandinsky22.jobs import DEFAULT_STRENGTH, MAX_MASK_BLUR
from kandinsky22.recipe import read_recipe, transcode

# -- service routes ----------------------------------------------------------------------------------------------------


def test_health_models_openapi_and_page(server, tiny_repos):
    health = server.request("GET", "/v1/health")
    assert health.status == 200 and health.json()["status"] == "ok"
    models = server.request("GET", "/v1/models").json()
    roles = {m["id"]: m["role"] for m in models["data"]}
    assert roles[str(tiny_repos["prior"])] == "prior" and roles[str(tiny_repos["decoder"])] == "decoder"
    assert set(models["tasks"]) == {"text2img", "img2img", "mix", "inpaint", "depth"}
    assert models["limits"]["max_queue"] == MAX_QUEUE and models["limits"]["max_batch"] == MAX_BATCH
    assert "ddpm" in models["schedulers"] and models["device"] == "cpu" and models["fast"] is False
    # what the page needs for the image tasks' inputs
    assert models["defaults"]["strength"] == DEFAULT_STRENGTH and models["limits"]["max_mask_blur"] == MAX_MASK_BLUR
    schema = server.request("GET", "/openapi.json").json()
    for path in ("/v1/images/generations", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/health"):
        assert path in schema["paths"]
    assert "JobRequest" in schema["components"]["schemas"]
    assert server.request("GET", "/docs").status == 200
    page = server.request("GET", "/")
    assert page.status == 200 and b"Generate" in page.body
    assert server.request("GET", "/static/app.js").status == 200


# -- OpenAI-compatible endpoint ----------------------------------------------------------------------------------------


def test_generations_b64_and_url_with_exact_size_seeds_and_recipe(server):
    body = {"prompt": "a red cat", "n": 2, "size": "64x96", "seed": 11, **FAST}
    response = server.request("POST", "/v1/images/generations", body)
    assert response.status == 200, response.body
    data = response.json()["data"]
    assert [item["seed"] for item in data] == [11, 12]
    images = [base64.b64decode(item["b64_json"]) for item in data]
    assert [png_image(png).size for png in images] == [(64, 96), (64, 96)]
    assert recipe(images[1])["seed"] == 12 and recipe(images[1])["prompt"] == "a red cat"
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))

    # Respaced noise levels: another image, recorded in its recipe and in the job
    spaced = server.request("POST", "/v1/images/generations", {**body, "scheduler": "euler", "sigmas": "beta"})
    assert spaced.status == 200, spaced.body
    beta = base64.b64decode(spaced.json()["data"][0]["b64_json"])
    assert recipe(beta)["sigmas"] == "beta" and "sigmas" not in recipe(images[0])
    assert server.request("GET", f"/v1/jobs/{spaced.headers['X-Job-Id']}").json()["sigmas"] == "beta"
    models = server.request("GET", "/v1/models").json()
    assert models["sigmas"]["spacings"] == ["karras", "exponential", "beta"] and "euler" in models["sigmas"]["samplers"]

    by_url = server.request("POST", "/v1/images/generations", {**body, "response_format": "url"})
    assert by_url.status == 200
    url = by_url.json()["data"][0]["url"]
    assert url.startswith(server.url + "/v1/jobs/")
    png = server.request("GET", url.removeprefix(server.url))
    assert png.status == 200 and png.headers["Content-Type"] == "image/png"
    np.testing.assert_array_equal(pixels(png.body), pixels(images[0]))
    job = server.request("GET", f"/v1/jobs/{by_url.headers['X-Job-Id']}").json()
    assert job["status"] == "succeeded" and job["seeds"] == [11, 12]
    assert {"prior_s", "decoder_s", "decode_s", "queue_s", "total_s"} <= set(job["timings"])


def magic(data: bytes) -> str:
    """The format a file's first bytes say it is."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return "webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else "?"


def test_generations_in_each_output_format_carry_the_recipe(server):
    body = {"prompt": "рыжий кот 🐱", "size": "64x64", "seed": 21, **FAST}
    files = {}
    for output_format, extra in (("png", {}), ("jpeg", {"output_compression": 50}), ("webp", {})):
        response = server.request("POST", "/v1/images/generations", {**body, "output_format": output_format, **extra})
        assert response.status == 200, response.body
        files[output_format] = base64.b64decode(response.json()["data"][0]["b64_json"])
        assert magic(files[output_format]) == output_format
        assert read_recipe(files[output_format])["prompt"] == "рыжий кот 🐱"
    # The same job: the same recipe in each, nothing in it about the format.
    assert read_recipe(files["jpeg"]) == read_recipe(files["webp"]) == read_recipe(files["png"])
    # output_compression is the encoder's quality (90 without it): the PNG's image encoded so gives the same bytes.
    assert files["jpeg"] == transcode(files["png"], "jpeg", 50)
    assert files["webp"] == transcode(files["png"], "webp", 90)

    by_url = server.request(
        "POST", "/v1/images/generations", {**body, "output_format": "jpeg", "response_format": "url"}
    )
    assert by_url.status == 200, by_url.body
    url = by_url.json()["data"][0]["url"]
    assert url == f"{server.url}/v1/jobs/{by_url.headers['X-Job-Id']}/images/0.jpg"
    jpeg = server.request("GET", url.removeprefix(server.url))
    assert jpeg.status == 200 and jpeg.headers["Content-Type"] == "image/jpeg"
    assert jpeg.body == transcode(files["png"], "jpeg", 90)


def test_job_images_are_served_with_their_formats_media_type_and_extension(server):
    for output_format, suffix, media_type, others in (
        ("webp", ".webp", "image/webp", (".png", ".jpg")),
        ("jpeg", ".jpg", "image/jpeg", (".png", ".webp")),
        ("png", ".png", "image/png", (".jpg", ".jpeg", ".webp")),
    ):
        body = {"prompt": "a red cat", "width": 64, "height": 64, "seed": 3, "output_format": output_format, **FAST}
        final = _run_job(server, body)
        assert final["status"] == "succeeded" and final["output_format"] == output_format
        path = f"/v1/jobs/{final['id']}/images/0{suffix}"
        assert final["images"][0]["url"] == server.url + path
        image = server.request("GET", path)
        assert image.status == 200 and image.headers["Content-Type"] == media_type, image.body
        assert magic(image.body) == output_format and read_recipe(image.body)["seed"] == 3
        # Another format's extension: a 404 that names the image's URL (a .png URL with JPEG bytes would mislead).
        for other in others:
            wrong = server.request("GET", f"/v1/jobs/{final['id']}/images/0{other}")
            assert wrong.status == 404 and wrong.error()["type"] == "not_found"
            assert wrong.error()["message"].endswith(f"its image 0 is at {path}"), wrong.error()
        if output_format == "jpeg":  # .jpeg names JPEG too, and extensions are read in any case
            for same in (".jpeg", ".JPG"):
                assert server.request("GET", f"/v1/jobs/{final['id']}/images/0{same}").body == image.body
        assert server.request("GET", f"/v1/jobs/{final['id']}/images/1{suffix}").status == 404


JOB = {"prompt": "a red cat", "width": 64, "height": 64, **FAST}


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        ("/v1/images/generations", {"output_format": "gif"}, "output_format", "'png', 'jpeg' or 'webp'"),
        ("/v1/images/generations", {"output_format": "jpg"}, "output_format", "'png', 'jpeg' or 'webp'"),
        ("/v1/jobs", {**JOB, "output_format": "JPEG"}, "output_format", "'png', 'jpeg' or 'webp'"),
        (
            "/v1/images/generations",
            {"output_format": "jpeg", "output_compression": 101},
            "output_compression",
            "output_compression must be from 0 to 100, got 101",
        ),
        (
            "/v1/jobs",
            {**JOB, "output_format": "webp", "output_compression": -1},
            "output_compression",
            "output_compression must be from 0 to 100, got -1",
        ),
        (
            "/v1/images/generations",
            {"output_compression": 80},
            "output_compression",
            "output_compression applies to output_format jpeg and webp (png is lossless)",
        ),
        ("/v1/jobs", {**JOB, "output_format": "jpeg", "output_compression": "high"}, "output_compression", "integer"),
        (
            "/v1/jobs",
            {**JOB, "output_format": "jpeg", "output_compression": True},
            "output_compression",
            "a boolean is not accepted",
        ),
    ],
)
def test_bad_output_formats_and_compressions_are_400s_naming_the_field(server, path, body, param, message):
    response = server.request("POST", path, {**GEN, **body} if path.endswith("generations") else body)
    assert response.status == 400, response.body
    error = response.error()
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error"


# -- load ----------------------------------------------------------------------------------------------------------------


def test_thirty_concurrent_requests_with_a_queue_of_eight(server):
    before = server.request("GET", "/v1/health").json()["images_generated"]
    blocker = start_blocker(server)

    def generate(i: int):
        body = {"prompt": f"request {i}", "size": "64x64", "seed": 1000 + i, **FAST}
        return server.request("POST", "/v1/images/generations", body)

    with concurrent.futures.ThreadPoolExecutor(max_workers=30) as pool:
        futures = [pool.submit(generate, i) for i in range(30)]
        # With the worker busy, exactly MAX_QUEUE requests are admitted; the others are answered at once.
        rejected = []
        for future in concurrent.futures.as_completed(futures, timeout=120):
            rejected.append(future.result())
            if len(rejected) == 30 - MAX_QUEUE:
                break
        blocker_state = server.request("GET", f"/v1/jobs/{blocker}").json()
        cancel(server, blocker)
        responses = [future.result(timeout=120) for future in futures]

    assert all(r.status in (200, 429) for r in responses), [r.status for r in responses]
    ok = [r for r in responses if r.status == 200]
    busy = [r for r in responses if r.status == 429]
    assert len(ok) + len(busy) == 30
    if blocker_state["status"] == "running":  # (it always is, unless it ran all its 2000 steps meanwhile)
        assert len(ok) == MAX_QUEUE
    for r in busy:
        assert int(r.headers["Retry-After"]) >= 1 and r.error()["type"] == "rate_limit_error"
    for r in ok:
        (item,) = r.json()["data"]
        assert png_image(base64.b64decode(item["b64_json"])).size == (64, 64)
    # Nothing lost: every accepted request got its own image, and the server still answers.
    seeds = sorted(r.json()["data"][0]["seed"] for r in ok)
    assert len(set(seeds)) == len(ok)
    health = server.request("GET", "/v1/health").json()
    assert health["images_generated"] - before == len(ok)
    assert health["queue"]["queued"] == 0 and health["queue"]["running"] == 0
    assert server.request("POST", "/v1/images/generations", {"prompt": "after", "size": "64x64", **FAST}).status == 200


# -- job API -------------------------------------------------------------------------------------------------------------


def test_job_progress_events_from_queued_to_succeeded(server):
    blocker = start_blocker(server)
    created = server.request("POST", "/v1/jobs", {"prompt": "a red cat", "width": 64, "height": 64, **FAST})
    assert created.status == 202 and created.headers["Location"] == f"/v1/jobs/{created.json()['id']}"
    job_id = created.json()["id"]
    events = server.events(job_id)
    first = next(events)
    assert first["status"] == "queued" and first["queue_position"] == 0
    server.request("DELETE", f"/v1/jobs/{blocker}")
    rest = list(events)
    assert [e["status"] for e in rest][-1] == "succeeded"
    assert {e["status"] for e in rest} <= {"queued", "running", "succeeded"}
    final = rest[-1]
    assert final["progress"]["stages"]["prior"] == {"step": 2, "steps": 2}
    assert final["progress"]["stages"]["decoder"] == {"step": 2, "steps": 2}
    assert final["images"][0]["url"].endswith(f"/v1/jobs/{job_id}/images/0.png")
    assert server.request("GET", f"/v1/jobs/{job_id}").json()["status"] == "succeeded"


def test_cancel_a_running_job_between_steps(server):
    job_id = start_blocker(server)
    cancelled = server.request("DELETE", f"/v1/jobs/{job_id}")
    assert cancelled.status == 202 and cancelled.json()["cancel_requested"] is True
    final = server.wait(job_id, {"succeeded", "failed", "cancelled"})
    assert final["status"] == "cancelled" and final["images"] == []
    stages = final["progress"]["stages"]
    assert stages["decoder"]["step"] < MAX_STEPS or stages["prior"]["step"] < MAX_STEPS
    assert server.request("GET", f"/v1/jobs/{job_id}/images/0.png").status == 404
    again = server.request("DELETE", f"/v1/jobs/{job_id}")
    assert again.status == 409 and "cancelled" in again.error()["message"]
    assert server.request("POST", "/v1/images/generations", {"prompt": "after", "size": "64x64", **FAST}).status == 200


def _source(size=(80, 64)) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _run_job(server, body) -> dict:
    created = server.request("POST", "/v1/jobs", body)
    assert created.status == 202, created.body
    return server.wait(created.json()["id"], {"succeeded", "failed", "cancelled"})


def test_img2img_inpaint_mix_and_depth_jobs(server):
    source = b64_png(_source())
    mask = PIL.Image.new("L", (80, 64), 0)
    mask.paste(255, (20, 16, 60, 48))
    img2img = _run_job(server, {"task": "img2img", "prompt": "a red cat", "image": source, "strength": 0.5, **FAST})
    assert img2img["status"] == "succeeded", img2img["error"]
    # No size given: the output takes the input's.
    assert (img2img["width"], img2img["height"]) == (80, 64)
    inpaint = _run_job(
        server, {"task": "inpaint", "prompt": "a hat", "image": source, "mask_image": b64_png(mask), **FAST}
    )
    assert inpaint["status"] == "succeeded", inpaint["error"]
    mix = _run_job(
        server,
        {"task": "mix", "items": ["a red cat", {"image": source}], "weights": [0.3, 0.7], "width": 64, "height": 64},
    )
    assert mix["status"] == "succeeded", mix["error"]
    depth = _run_job(server, {"task": "depth", "prompt": "a room", "hint_image": source, **FAST})
    assert depth["status"] == "succeeded", depth["error"]
    png = server.request("GET", f"/v1/jobs/{inpaint['id']}/images/0.png").body
    assert png_image(png).size == (80, 64) and recipe(png)["task"] == "inpaint"
    # keep_unmasked: the source's own pixels outside the mask, recorded in the job and the recipe
    kept = _run_job(
        server,
        {"task": "inpaint", "prompt": "a hat", "image": source, "mask_image": b64_png(mask), "keep_unmasked": True}
        | FAST,
    )
    assert kept["status"] == "succeeded" and kept["keep_unmasked"] is True, kept["error"]
    kept_png = server.request("GET", f"/v1/jobs/{kept['id']}/images/0.png").body
    outside = np.asarray(mask) == 0
    assert np.array_equal(pixels(kept_png)[outside], np.asarray(_source().convert("RGB"))[outside])
    assert recipe(kept_png)["keep_unmasked"] is True and "keep_unmasked" not in recipe(png)
    blurred = _run_job(
        server,
        {"task": "inpaint", "prompt": "a hat", "image": source, "mask_image": b64_png(mask), "mask_blur": 2.5} | FAST,
    )
    assert blurred["status"] == "succeeded" and blurred["mask_blur"] == 2.5, blurred["error"]


def test_multipart_upload(server):
    buffer = io.BytesIO()
    _source((64, 64)).save(buffer, format="PNG")
    boundary = "kandinsky22-test-boundary"
    parts = []
    fields = {"task": "img2img", "prompt": "a red cat", "steps": "4", "prior_steps": "2", "strength": "0.5"}
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + buffer.getvalue()
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    created = server.request(
        "POST", "/v1/jobs", raw=b"".join(parts), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert created.status == 202, created.body
    assert created.json()["steps"] == 4 and created.json()["strength"] == 0.5
    final = server.wait(created.json()["id"], {"succeeded", "failed", "cancelled"})
    assert final["status"] == "succeeded", final["error"]


# -- bad requests --------------------------------------------------------------------------------------------------------

GEN = {"prompt": "a red cat", "size": "64x64", **FAST}


def _bomb() -> str:
    buffer = io.BytesIO()
    PIL.Image.new("L", (5000, 5000)).save(buffer, format="PNG")  # 25 MP, a few KiB compressed
    return base64.b64encode(buffer.getvalue()).decode()


def _png_b64(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# An img2img job that validates (enough steps for the strength), without a size: the input's size is used.
IMG2IMG = {"task": "img2img", "prompt": "x", "steps": 10, "prior_steps": 2, "strength": 0.5}

BAD_REQUESTS = [
    ("/v1/images/generations", {**GEN, "size": "64"}, 400, "size"),
    ("/v1/images/generations", {**GEN, "size": "4096x4096"}, 400, "width"),
    ("/v1/images/generations", {**GEN, "steps": 0}, 400, "steps"),
    ("/v1/images/generations", {**GEN, "steps": MAX_STEPS + 1}, 400, "steps"),
    # Within --max-steps, but the decoder's DDPM config would start at the untrained timestep 1000: the job was
    # accepted, ran its prior, then failed (a 500).
    ("/v1/images/generations", {**GEN, "steps": 1000}, 400, "steps"),
    ("/v1/jobs", {"prompt": "x", "width": 64, "height": 64, **FAST, "steps": 1000, "scheduler": "ddim"}, 400, "steps"),
    ("/v1/images/generations", {**GEN, "steps": "many"}, 400, "steps"),
    ("/v1/images/generations", {**GEN, "n": 0}, 400, "n"),
    ("/v1/images/generations", {**GEN, "n": 99}, 400, "n"),
    ("/v1/images/generations", {**GEN, "prompt": "x" * 2001}, 400, "prompt"),
    ("/v1/images/generations", {**GEN, "prompt": "  "}, 400, "prompt"),
    ("/v1/images/generations", {**GEN, "guidance": 5}, 400, "guidance"),
    ("/v1/images/generations", {**GEN, "guidance_scale": 0.5}, 400, "guidance_scale"),
    ("/v1/images/generations", {**GEN, "scheduler": "magic"}, 400, "scheduler"),
    ("/v1/images/generations", {**GEN, "scheduler": "euler", "sigmas": "cosine"}, 400, "sigmas"),
    ("/v1/jobs", {"prompt": "x", "width": 64, "height": 64, **FAST, "sigmas": "karras"}, 400, "sigmas"),
    ("/v1/jobs", {"prompt": "x", "width": 64, "height": 64, **FAST, "keep_unmasked": True}, 400, "keep_unmasked"),
    ("/v1/jobs", {**IMG2IMG, "keep_unmasked": 1}, 400, "keep_unmasked"),  # true or false only: 1 was read as true
    ("/v1/jobs", {**IMG2IMG, "mask_blur": 3}, 400, "mask_blur"),
    ("/v1/images/generations", {**GEN, "response_format": "png"}, 400, "response_format"),
    ("/v1/jobs", {"task": "paint", "prompt": "x"}, 400, "task"),
    ("/v1/jobs", {"task": "img2img", "prompt": "x"}, 400, "image"),
    ("/v1/jobs", {"task": "img2img", "prompt": "x", "image": "not base64!"}, 400, "image"),
    ("/v1/jobs", {"task": "img2img", "prompt": "x", "image": base64.b64encode(b"GIF89 no").decode()}, 400, "image"),
    ("/v1/jobs", {"task": "img2img", "prompt": "x", "image": _bomb()}, 400, "image"),
    ("/v1/jobs", {"task": "mix", "items": ["/etc/hosts.png"], "weights": [1]}, 400, "items"),
    ("/v1/jobs", {"task": "mix", "items": ["a", "b"], "weights": [1]}, 400, "weights"),
    ("/v1/jobs", {"prompt": "x", "seed": -1}, 400, "seed"),
    # The prior's scheduler needs two steps: one was accepted, then failed in the worker (a 500).
    ("/v1/images/generations", {**GEN, "prior_steps": 1}, 400, "prior_steps"),
    ("/v1/jobs", {"prompt": "x", "width": 64, "height": 64, **FAST, "prior_steps": 1}, 400, "prior_steps"),
    # true is not a number: it was read as 1.
    ("/v1/images/generations", {**GEN, "steps": True}, 400, "steps"),
    ("/v1/jobs", {"prompt": "x", "width": 64, "height": 64, **FAST, "seed": True}, 400, "seed"),
    ("/v1/jobs", {"prompt": "x", "width": 64, "height": 64, **FAST, "guidance_scale": True}, 400, "guidance_scale"),
    # --max-side (256 here) holds for a side taken from the other and the input image's aspect too.
    ("/v1/jobs", {**IMG2IMG, "width": 64, "image": _png_b64((64, 600))}, 400, "height"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_a_json_error_naming_the_field(server, path, body, status, param):
    response = server.request("POST", path, body)
    assert response.status == status, response.body
    error = response.error()
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_a_size_not_given_stays_within_max_side(server):
    # --max-side is 256 here: the default size and an input image's size are brought within it (they were 400s).
    assert server.request("GET", "/v1/models").json()["defaults"]["width"] == 256
    for body, size in (
        ({**IMG2IMG, "image": _png_b64((300, 200))}, (256, 171)),
        ({"task": "mix", "items": ["a"], "weights": [1], **FAST}, (256, 256)),
        ({"prompt": "x", **FAST}, (256, 256)),
    ):
        created = server.request("POST", "/v1/jobs", body)
        assert created.status == 202, created.body
        assert (created.json()["width"], created.json()["height"]) == size
        job = server.wait(created.json()["id"], {"succeeded", "failed", "cancelled"})
        assert job["status"] == "succeeded", job["error"]
    # The OpenAI route too: a request without "size" got 512x512 and a 400 under a smaller --max-side.
    response = server.request("POST", "/v1/images/generations", {"prompt": "x", **FAST})
    assert response.status == 200, response.body
    image = PIL.Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert image.size == (256, 256)


def test_a_mix_text_naming_a_server_file_is_a_text(server, tmp_path):
    # A text that named an existing file was refused (the client learned that the file exists); one naming an image
    # without a suffix would have been read from the server's disk. Both are texts to mix.
    picture = tmp_path / "picture"
    _source().save(picture, format="PNG")
    for text in (str(picture), __file__):
        body = {"task": "mix", "items": [text], "weights": [1], "width": 64, "height": 64, **FAST}
        job = _run_job(server, body)
        assert job["status"] == "succeeded", job["error"]
        png = server.request("GET", f"/v1/jobs/{job['id']}/images/0.png").body
        assert recipe(png)["items"] == [text]


def test_malformed_bodies_and_unknown_routes(server):
    garbage = server.request("POST", "/v1/jobs", raw=b"{not json", headers={"Content-Type": "application/json"})
    assert garbage.status == 400 and "JSON" in garbage.error()["message"]
    # The OpenAI route's body is parsed by FastAPI: the error names no field (it named the character offset, "1").
    raw = b"{not json"
    generation = server.request("POST", "/v1/images/generations", raw=raw, headers={"Content-Type": "application/json"})
    assert generation.status == 400 and "not valid JSON" in generation.error()["message"]
    assert generation.error()["param"] is None
    listed = server.request("POST", "/v1/jobs", [1, 2])
    assert listed.status == 400
    for method, path in (("GET", "/v1/jobs/nope"), ("DELETE", "/v1/jobs/nope"), ("GET", "/v1/jobs/nope/images/0.png")):
        response = server.request(method, path)
        assert response.status == 404 and response.error()["type"] == "not_found"
    assert server.request("GET", "/v1/nothing").status == 404
    assert server.request("PUT", "/v1/health").status == 405


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_is_refused(server, chunked):
    limit = MAX_BODY_MB * 1024 * 1024
    conn = http.client.HTTPConnection(server.host, int(server.port), timeout=60)
    try:
        conn.putrequest("POST", "/v1/jobs")
        conn.putheader("Content-Type", "application/json")
        if chunked:
            # No length announced: the server counts while reading, and reads what was sent before answering.
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            chunk = b"x" * (64 * 1024)
            conn.send(b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(limit // len(chunk) + 1)))
            conn.send(b"0\r\n\r\n")
        else:
            # An announced length over the limit is refused before any of the body is sent.
            conn.putheader("Content-Length", str(limit + 1))
            conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"]["message"] == f"the request body is larger than {limit} bytes"
    finally:
        conn.close()


def test_a_16_bit_upload_keeps_its_levels():
    """An uploaded 16-bit greyscale PNG (a depth map) is read as its 8-bit levels, not clipped at 255 (white)."""
    from kandinsky22.server.schemas import Limits, decode_image

    levels = np.tile(np.arange(256, dtype=np.uint16), (4, 1))
    image = decode_image(b64_png(PIL.Image.fromarray(levels * 257)), "hint_image", Limits())
    assert np.array_equal(np.asarray(image.convert("L")), levels.astype(np.uint8))


def test_an_uploaded_photo_is_read_as_shown_by_its_exif_orientation():
    """A phone photo (stored sideways with an EXIF orientation) is used as it is shown, not sideways."""
    from kandinsky22.server.schemas import Limits, decode_image

    stored = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to show
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif)
    image = decode_image(base64.b64encode(buffer.getvalue()).decode(), "image", Limits())
    assert np.array_equal(np.asarray(image), np.asarray(stored.transpose(PIL.Image.Transpose.ROTATE_270)))
