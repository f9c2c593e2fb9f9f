"""AutoPipelines: pick the Kandinsky 2.2 pipeline for a task from a repository (or from another pipeline).

As in the reference (reference-behaviour.md §1.9), any Kandinsky 2.2 decoder repository — or a folder saved by a
combined pipeline — gives the task's *combined* pipeline (prior + decoder), the prior found through the decoder
repository's model card. Unlike the reference, a repository whose UNet cannot do the task (the 4-channel decoder for
inpainting, the 9-channel inpaint decoder for text2img) is refused when loading, with a message naming the right one,
instead of failing inside the first call.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, ClassVar

from kandinsky22 import loading
from kandinsky22.pipelines.base import Pipeline, hub_options
from kandinsky22.pipelines.combined import (
    KandinskyV22CombinedPipeline,
    KandinskyV22Img2ImgCombinedPipeline,
    KandinskyV22InpaintCombinedPipeline,
    _CombinedPipeline,
)
from kandinsky22.pipelines.decoder import DecoderPipeline

# The model_index `_class_name`s of Kandinsky 2.2 decoder and combined folders.
KANDINSKY22_CLASS_NAMES = (
    "KandinskyV22Pipeline",
    "KandinskyV22Img2ImgPipeline",
    "KandinskyV22InpaintPipeline",
    "KandinskyV22CombinedPipeline",
    "KandinskyV22Img2ImgCombinedPipeline",
    "KandinskyV22InpaintCombinedPipeline",
)
_OTHER_CLASS_HINTS = {
    "KandinskyV22PriorPipeline": "it is a prior repository: load a decoder repository (its model card names the prior)",
    "KandinskyV22ControlnetPipeline": "use KandinskyV22ControlnetPipeline or KandinskyV22ControlnetImg2ImgPipeline",
}


class _AutoPipeline:
    """``from_pretrained`` and ``from_pipe`` only; a task names its combined class and its decoder-only class."""

    task: ClassVar[str]
    combined_class: ClassVar[type[_CombinedPipeline]]
    decoder: ClassVar[tuple[str, str]]  # (module, class) of the decoder-only pipeline, imported on use
    inpainting: ClassVar[bool] = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is built with from_pretrained(...) or from_pipe(...)")

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **kwargs: Any) -> _CombinedPipeline:
        """The task's combined pipeline for a Kandinsky 2.2 decoder (or combined) folder or hub repository.

        ``kwargs`` go to the combined pipeline's ``from_pretrained`` (``torch_dtype``, ``variant``, ``prior_path``,
        components by name, loading options such as ``revision`` or ``local_files_only``).
        """
        hub = hub_options(kwargs)
        _, index = loading.read_model_index(path_or_id, **hub)
        class_name = index.get("_class_name")
        if class_name not in KANDINSKY22_CLASS_NAMES:
            hint = _OTHER_CLASS_HINTS.get(class_name, f"supported: {list(KANDINSKY22_CLASS_NAMES)}")
            raise ValueError(f"{cls.__name__} cannot load '{path_or_id}' (a {class_name}): {hint}")
        if "unet" not in kwargs:
            unet_folder = loading.resolve_folder(path_or_id, "unet", [loading.CONFIG_NAME], **hub)
            cls._check_unet(loading.read_json(unet_folder / loading.CONFIG_NAME), str(path_or_id))
        return cls.combined_class.from_pretrained(path_or_id, **kwargs)

    @classmethod
    def _check_unet(cls, config: dict, source: str) -> None:
        channels, hint = config.get("in_channels"), config.get("addition_embed_type") == "image_hint"
        wanted = 9 if cls.inpainting else 4
        if channels != wanted or hint:
            repo = "kandinsky-2-2-decoder-inpaint" if cls.inpainting else "kandinsky-2-2-decoder"
            raise ValueError(
                f"'{source}' holds a UNet with {channels} input channels"
                f"{' and a depth hint' if hint else ''}; {cls.task} needs {wanted} (a {repo} repository)"
            )

    @classmethod
    def from_pipe(cls, pipeline: Pipeline, **components: Any) -> Pipeline:
        """The task's pipeline sharing ``pipeline``'s modules: combined in → combined out, decoder → decoder.

        ``components`` replace some of them (e.g. ``scheduler=``).
        """
        if isinstance(pipeline, _CombinedPipeline):
            target = cls.combined_class
        elif isinstance(pipeline, DecoderPipeline):
            module, name = cls.decoder
            target = getattr(importlib.import_module(module), name)
        else:
            raise ValueError(
                f"{cls.__name__}.from_pipe takes a Kandinsky 2.2 decoder or combined pipeline, got "
                f"{type(pipeline).__name__}"
            )
        unknown = [k for k in components if k not in target.component_names]
        if unknown:
            raise ValueError(f"{target.__name__} has no components {unknown}; it has {list(target.component_names)}")
        cls._check_unet(dict(pipeline.unet.config), type(pipeline).__name__)
        return target(**{**pipeline.components, **components})


class AutoPipelineForText2Image(_AutoPipeline):
    task = "text-to-image"
    combined_class = KandinskyV22CombinedPipeline
    decoder = ("kandinsky22.pipelines.decoder", "KandinskyV22Pipeline")


class AutoPipelineForImage2Image(_AutoPipeline):
    task = "image-to-image"
    combined_class = KandinskyV22Img2ImgCombinedPipeline
    decoder = ("kandinsky22.pipelines.img2img", "KandinskyV22Img2ImgPipeline")


class AutoPipelineForInpainting(_AutoPipeline):
    task = "inpainting"
    combined_class = KandinskyV22InpaintCombinedPipeline
    decoder = ("kandinsky22.pipelines.inpaint", "KandinskyV22InpaintPipeline")
    inpainting = True
