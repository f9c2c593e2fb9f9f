"""``kandinsky22 serve --lora SOURCE[:WEIGHT]``: the adapters applied at start-up, listed by /v1/models and recorded
in the images' recipes (which the CLI re-applies)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from server_harness import FAST, Server, pixels, recipe

from kandinsky22.recipe import file_sha256

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


@pytest.fixture(scope="module")
def lora_server(tiny_repos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("lora")
    _write_lora(folder / "pytorch_lora_weights.safetensors")
    args = ["--prior", str(tiny_repos["prior"]), "--decoder", str(tiny_repos["decoder"]), "--max-side", "256"]
    server = Server([*args, "--lora", f"{folder}:0.8"])  # a folder: the file kandinsky22.lora picks in it
    server.lora = folder
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


def test_the_page_names_the_servers_loras(lora_server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
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
