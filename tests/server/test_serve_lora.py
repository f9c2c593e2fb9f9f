"""``kandinsky22 serve --lora SOURCE[:WEIGHT]``: the adapters applied at start-up, listed by /v1/models and recorded
in the images' recipes (which the CLI re-applies); a request's ``loras`` choosing among them."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from server_harness import FAST, TERMINAL, Server, cancel, limit_args, pixels, recipe, start_blocker

from kandinsky22.jobs import Job
from kandinsky22.lora_specs import LoraSpec
from kandinsky22.recipe import file_sha256
from kandinsky22.server.schemas import served_loras

SCRIPT = shutil.which("kandinsky22")
COMMAND = [SCRIPT] if SCRIPT else [sys.executable, "-m", "kandinsky22.cli"]


def _write_lora(path: Path) -> Path:
    """peft-layout LoRA of two attentions of the tiny UNet, non-zero so that it changes the image."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for module in ("down_blocks.1.attentions.0.to_q", "mid_block.attentions.0.to_v"):
        state[f"unet.{module}.lora_A.weight"] = torch.randn(4, 64, generator=generator)
        state[f"unet.{module}.lora_B.weight"] = torch.randn(64, 4, generator=generator)
    save_file(state, str(path))
    return path


def _write_prior_lora(path: Path) -> Path:
    """peft-layout LoRA of one attention of the tiny prior (none of the UNet: the UNet has no part of it)."""
    generator = torch.Generator().manual_seed(1)
    state = {
        "prior.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 24, generator=generator),
        "prior.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(24, 4, generator=generator),
    }
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lora")
    _write_lora(folder / "pytorch_lora_weights.safetensors")
    return folder


def _model_args(tiny_repos: dict[str, Path]) -> list[str]:
    return ["--prior", str(tiny_repos["prior"]), "--decoder", str(tiny_repos["decoder"])]


@pytest.fixture(scope="module")
def lora_server(tiny_repos: dict[str, Path], lora_folder: Path):
    server = Server([*_model_args(tiny_repos), "--max-side", "256", "--lora", f"{lora_folder}:0.8"])  # a folder: the
    server.lora = lora_folder  # file kandinsky22.lora picks in it
    yield server
    server.stop()


@pytest.fixture(scope="module")
def two_lora_server(tiny_repos: dict[str, Path], lora_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    """The UNet LoRA of lora_server at another weight, and a prior-only LoRA; the main server's limits (a blocker)."""
    prior_lora = _write_prior_lora(tmp_path_factory.mktemp("prior-lora") / "prior.safetensors")
    loras = ["--lora", f"{lora_folder}:0.3", "--lora", f"{prior_lora}:0.5"]
    server = Server([*_model_args(tiny_repos), *limit_args(), *loras])
    server.loras = [str(lora_folder), str(prior_lora)]
    yield server
    server.stop()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*COMMAND, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_the_startup_loras_are_listed_recorded_and_re_applied_by_the_cli(lora_server: Server, tmp_path: Path) -> None:
    file = lora_server.lora / "pytorch_lora_weights.safetensors"
    expected = {"source": str(lora_server.lora), "weight": 0.8, "sha256": file_sha256(file)}
    models = lora_server.request("GET", "/v1/models").json()
    assert models["loras"] == [{**expected, "adapts": ["unet"]}]

    body = {"prompt": "a red cat", "size": "64x64", "seed": 21, **FAST}
    response = lora_server.request("POST", "/v1/images/generations", body)
    assert response.status == 200, response.body
    png = base64.b64decode(response.json()["data"][0]["b64_json"])
    assert recipe(png)["loras"] == [expected]

    # The CLI re-makes the server's image from its recipe, LoRA included; without the LoRA it differs.
    (tmp_path / "served.png").write_bytes(png)
    again = _cli("generate", "--from-png", "served.png", "--quiet", "-o", "again.png", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(pixels((tmp_path / "again.png").read_bytes()), pixels(png))
    off = _cli("generate", "--from-png", "served.png", "--lora", f"{file}:0", "--quiet", "-o", "off.png", cwd=tmp_path)
    assert off.returncode == 0, off.stderr
    assert not np.array_equal(pixels((tmp_path / "off.png").read_bytes()), pixels(png))


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ("gone.safetensors", "kandinsky22 serve: error: --lora gone.safetensors: no such file or folder"),
        ("x.safetensors:inf", "kandinsky22 serve: error: argument --lora: WEIGHT must be a finite number, got 'inf'"),
    ],
)
def test_a_bad_lora_option_exits_2_before_the_server_starts(lora: str, message: str, tmp_path: Path) -> None:
    result = _cli("serve", "--port", "0", "--lora", lora, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(message)
    assert "listening" not in result.stdout


def _chromium():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    return sync_api, chromium


def test_the_page_names_the_servers_loras(lora_server):
    sync_api, chromium = _chromium()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page()
            page.goto(lora_server.url + "/")
            page.wait_for_selector("#scheduler option[value=ddpm]", state="attached")
            info = page.inner_text("#server-info")
            assert f"+ LoRA {lora_server.lora.name} ×0.8 ·" in info, info
            assert f"LoRA (unet): {lora_server.lora} ×0.8" in page.get_attribute("#server-info", "title")
        finally:
            browser.close()


# ----------------------------------------------------------------------------------------------------------------------
# A request's "loras": which of the server's LoRAs apply, and how strongly
# ----------------------------------------------------------------------------------------------------------------------

CAT = {"prompt": "a red cat", "size": "64x64", "seed": 21, **FAST}


def _generate(server: Server, body: dict) -> bytes:
    response = server.request("POST", "/v1/images/generations", body)
    assert response.status == 200, response.body
    return base64.b64decode(response.json()["data"][0]["b64_json"])


def test_a_requests_loras_give_the_image_of_a_server_started_with_those_weights(
    two_lora_server: Server, lora_server: Server, server: Server, tmp_path: Path
) -> None:
    style, prior_only = two_lora_server.loras
    sha = {style: file_sha256(Path(style) / "pytorch_lora_weights.safetensors"), prior_only: file_sha256(prior_only)}
    defaults = _generate(two_lora_server, CAT)
    assert recipe(defaults)["loras"] == [
        {"source": style, "weight": 0.3, "sha256": sha[style]},
        {"source": prior_only, "weight": 0.5, "sha256": sha[prior_only]},
    ]
    # The UNet LoRA alone at 0.8 (the prior's off): lora_server's image, and its recipe says so.
    chosen = _generate(two_lora_server, {**CAT, "loras": [{"source": style, "weight": 0.8}]})
    assert np.array_equal(pixels(chosen), pixels(_generate(lora_server, CAT)))
    assert recipe(chosen)["loras"] == [{"source": style, "weight": 0.8, "sha256": sha[style]}]
    assert not np.array_equal(pixels(chosen), pixels(defaults))
    # [] turns them all off: the image of a server without LoRAs, and a recipe without any.
    off = _generate(two_lora_server, {**CAT, "loras": []})
    assert np.array_equal(pixels(off), pixels(_generate(server, CAT)))
    assert "loras" not in recipe(off)
    # Without "loras", the server's own weights again.
    assert np.array_equal(pixels(_generate(two_lora_server, CAT)), pixels(defaults))

    # The CLI re-makes the chosen image from its recipe: the UNet LoRA at 0.8, no prior LoRA.
    (tmp_path / "chosen.png").write_bytes(chosen)
    again = _cli("generate", "--from-png", "chosen.png", "--quiet", "-o", "again.png", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(pixels((tmp_path / "again.png").read_bytes()), pixels(chosen))


def test_requests_of_different_lora_choices_queued_together_run_in_separate_calls(
    two_lora_server: Server, lora_server: Server, server: Server
) -> None:
    style, prior_only = two_lora_server.loras
    job = {"prompt": CAT["prompt"], "seed": CAT["seed"], "width": 64, "height": 64, **FAST}
    bodies = [
        {**job, "loras": [{"source": style, "weight": 0.8}]},
        {**job, "loras": []},
        # the first one's choice, listed otherwise: it shares the first one's call
        {**job, "seed": 22, "loras": [{"source": prior_only, "weight": 0}, {"source": style, "weight": 0.8}]},
    ]
    blocker = start_blocker(two_lora_server)
    ids = []
    for body in bodies:
        response = two_lora_server.request("POST", "/v1/jobs", body)
        assert response.status == 202, response.body
        ids.append(response.json()["id"])
    cancel(two_lora_server, blocker)
    finals = [two_lora_server.wait(job_id, TERMINAL) for job_id in ids]
    assert [f["status"] for f in finals] == ["succeeded"] * 3
    assert [f["batch_size"] for f in finals] == [2, 1, 2]
    assert finals[1]["loras"] == [{"source": style, "weight": 0.0}, {"source": prior_only, "weight": 0.0}]
    images = [pixels(two_lora_server.request("GET", f"/v1/jobs/{job_id}/images/0.png").body) for job_id in ids]
    # Alone, the LoRA-less job's image is the LoRA-less server's, to the bit; the batch of two, to within one level
    # in a few pixels (test_batching.py: matmul kernels sum in an order that follows the batch size).
    assert np.array_equal(images[1], pixels(_generate(server, CAT)))
    for image, seed in ((images[0], 21), (images[2], 22)):
        difference = np.abs(image.astype(int) - pixels(_generate(lora_server, {**CAT, "seed": seed})))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    assert np.abs(images[0].astype(int) - images[1]).mean() > 1


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/jobs"])
@pytest.mark.parametrize(
    ("loras", "message"),
    [
        ([{"source": "nope", "weight": 1}], "loras[0].source 'nope' is not a LoRA of this server; its LoRAs (as GET "),
        (
            [{"source": "{style}", "weight": 1}, {"source": "{style}", "weight": 0.5}],
            "loras[1].source '{style}' is listed twice (also as loras[0])",
        ),
        ([{"source": "{style}", "weight": float("nan")}], "loras[0].weight must be a number from -8 to 8, got nan"),
        ([{"source": "{style}", "weight": float("-inf")}], "loras[0].weight must be a number from -8 to 8, got -inf"),
        ([{"source": "{style}", "weight": 8.5}], "loras[0].weight must be from -8 to 8, got 8.5"),
        ([{"source": "{style}", "weight": True}], "loras.0.weight: Value error, a boolean is not accepted here"),
        ([{"source": "{style}"}], "loras.0.weight: Field required"),
        ([{"source": "{style}", "weight": 1, "file": "x"}], "loras.0.file: Extra inputs are not permitted"),
        ("{style}", "loras: Input should be a valid list"),
    ],
)
def test_a_bad_lora_choice_is_a_400_naming_the_field_and_the_value(
    two_lora_server: Server, path: str, loras: object, message: str
) -> None:
    style = two_lora_server.loras[0]
    loras = json.loads(json.dumps(loras).replace("{style}", style))
    body = {"prompt": "a cat", "seed": 1, **FAST, "loras": loras}
    response = two_lora_server.request("POST", path, body)
    assert response.status == 400, response.body
    error = response.error()
    assert error["param"] == "loras" and error["message"].startswith(message.replace("{style}", style)), error
    if "is not a LoRA" in message:  # the known ones are listed
        assert error["message"].endswith(f"{style!r}, {two_lora_server.loras[1]!r}"), error
    assert two_lora_server.request("GET", "/v1/health").status == 200


def test_loras_on_a_server_without_any_is_a_400_and_multipart_takes_them_as_json(
    server: Server, two_lora_server: Server
) -> None:
    for path in ("/v1/images/generations", "/v1/jobs"):
        response = server.request("POST", path, {"prompt": "a cat", **FAST, "loras": []})
        assert response.status == 400 and response.error()["param"] == "loras", response.body
        assert (
            response.error()["message"]
            == "loras: this server has no LoRAs (they are given at its start: serve --lora SOURCE[:WEIGHT]); got []"
        )
    boundary = "kandinsky22-lora-boundary"
    fields = {
        "prompt": "a cat",
        "width": "64",
        "height": "64",
        "steps": "2",
        "prior_steps": "2",
        "loras": '[{"source": "x", "weight": 1}]',
    }
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    raw = b"".join([*parts, f"--{boundary}--\r\n".encode()])
    response = two_lora_server.request(
        "POST", "/v1/jobs", raw=raw, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status == 400 and response.error()["message"].startswith("loras[0].source 'x' is not a LoRA"), (
        response.body
    )


def test_the_page_has_a_weight_input_for_each_lora_and_models_says_how_to_choose(
    two_lora_server: Server, server: Server
) -> None:
    page = two_lora_server.request("GET", "/").body.decode()
    style, prior_only = two_lora_server.loras
    for source, weight in ((style, "0.3"), (prior_only, "0.5")):
        assert f'value="{weight}" data-source="{source}"' in page, page
    assert page.count('class="lora"') == 2
    plain = server.request("GET", "/").body.decode()
    assert 'class="lora"' not in plain and "<!-- lora" not in plain
    assert '"loras": [{"source"' in two_lora_server.request("GET", "/v1/models").json()["loras_per_request"]
    assert "loras_per_request" not in server.request("GET", "/v1/models").json()


def test_a_choice_names_every_lora_of_the_server_and_no_choice_is_left_to_the_engine() -> None:
    served = [LoraSpec("a", 10.0), LoraSpec("b", 0.5)]  # start-up weights are the command line's: not within ±8
    assert served_loras([LoraSpec("b", 2.0)], served) == [LoraSpec("a", 0.0), LoraSpec("b", 2.0)]
    assert served_loras(None, served) is None
    Job(prompt="a cat", loras=served_loras(None, served)).validate()


def test_the_page_sends_its_lora_weights(two_lora_server: Server, lora_server: Server) -> None:
    sync_api, chromium = _chromium()
    style, prior_only = two_lora_server.loras
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page()
            page.set_default_timeout(120_000)
            page.goto(two_lora_server.url + "/")
            page.wait_for_selector("#scheduler option[value=ddpm]", state="attached")
            assert [page.input_value("#lora-0"), page.input_value("#lora-1")] == ["0.3", "0.5"]
            page.fill("#prompt", CAT["prompt"])
            for field, value in (("width", "64"), ("height", "64"), ("steps", "2"), ("prior_steps", "2")):
                page.fill(f"#{field}", value)
            page.fill("#seed", str(CAT["seed"]))
            page.fill("#lora-0", "0.8")
            page.fill("#lora-1", "0")
            page.click("#generate")
            url = page.wait_for_selector("figure.result img").get_attribute("src")
        finally:
            browser.close()
    job_id = url.split("/v1/jobs/", 1)[1].split("/", 1)[0]
    assert two_lora_server.request("GET", f"/v1/jobs/{job_id}").json()["loras"] == [
        {"source": style, "weight": 0.8},
        {"source": prior_only, "weight": 0.0},
    ]
    made = pixels(two_lora_server.request("GET", f"/v1/jobs/{job_id}/images/0.png").body)
    assert np.array_equal(made, pixels(_generate(lora_server, CAT)))
