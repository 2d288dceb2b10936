"""Loading and saving SAM weights: HF InstructBLIP, LAVIS / released-SAM checkpoints, deltas.

Everything here is plain functions; `sam_fast.SAM`'s classmethods forward to them (``cls`` is
the SAM class, or any subclass of `PreTrainedModel` with the same state-dict layout).

Public functions
----------------
``from_instructblip(cls, path_or_model, *, dtype=None, device=None, copy=False, strict=True,
return_report=False, **config_overrides) -> SAM``
    Build SAM from an HF InstructBLIP directory (``config.json`` + ``model.safetensors`` or a
    sharded ``model.safetensors.index.json``; ``pytorch_model.bin[.index.json]`` also read), a SAM
    directory saved with ``save_pretrained`` (``model_type == "sam_fast"``), or an in-memory
    `InstructBlipForConditionalGeneration` / SAM. The model is built with its parameters on the
    meta device and the checkpoint tensors are *assigned* (no second copy of a 7B model in RAM);
    an in-memory source therefore shares storage with the result unless ``copy=True``, and
    tensors read from ``.safetensors`` files without a dtype cast stay memory-mapped, as with HF
    ``from_pretrained`` (do not overwrite those files while the model is alive). The three
    new modules (``adaptive_adjustment``, ``guidance_in``, ``guidance_out``) start as the paper
    starts them (``model.reset_guidance_parameters()``: guidance zero) when the source lacks them.
    Then ``model.freeze_backbone()`` and ``model.eval()``.
    ``config_overrides`` go to ``SAMConfig.from_instructblip_config`` (``context_mode``,
    ``guidance``, ``interaction_layers``, ...); ``dtype`` (cast floating tensors while reading;
    ``cls._keep_in_fp32_modules`` such as ``query_tokens`` stay float32 under float16, as in HF),
    ``device`` (where tensors are placed), ``copy``, ``strict`` and ``return_report`` are
    reserved keyword names of this loader. Raises ValueError listing unexpected keys (a warning
    instead when ``strict=False``), shape mismatches and missing keys other than the three new
    modules (those can never be filled in, so they raise even with ``strict=False``).
    With ``return_report=True`` returns ``(model, LoadReport)``.

``lavis_to_sam_state_dict(sd) -> (new_sd, unmapped)``
    Rename a LAVIS ``blip2_vicuna_instruct`` or released-SAM state dict to our keys (the table:
    docs/model.md#checkpoint-key-maps). Tensors are not copied, except the EVA-ViT
    ``q_bias``/``v_bias`` pairs which become
    ``qkv.bias = cat[q_bias, zeros, v_bias]``. ``unmapped`` lists every input key that was not
    mapped, sorted; ``is_ignored_lavis_key(k)`` tells which of them are dropped on purpose
    (see ``IGNORED_LAVIS_KEYS``).

``from_lavis_checkpoint(cls, path, config=None, *, base=None, strict=True, context_mode=None,
dtype=None, device=None, copy=False, return_report=False) -> SAM``
    Load a LAVIS checkpoint file over the sources in ``base``. ``path`` and every ``.pth`` in
    ``base`` are read with ``torch.load(weights_only=True)``; a LAVIS runner checkpoint (a dict with
    ``model`` plus ``optimizer`` / ``config`` / ``scaler`` / ``epoch``) gives its ``model`` entry.
    ``base`` is one source or a list of them; each is
      - a LAVIS ``.pth`` (full, or trimmed like ``instruct_blip_vicuna7b_trimmed.pth``: query
        tokens, ``ln_vision``, Q-former, ``llm_proj``),
      - an EVA ViT ``.pth`` with unprefixed keys (LAVIS' ``eva_vit_g.pth``: ``cls_token``,
        ``blocks.0.attn.q_bias``, ...; its final norm / head and blocks past the configured depth
        are dropped as LAVIS drops them, listed in ``LoadReport.ignored``),
      - an HF LLM directory (``LlamaForCausalLM``, e.g. Vicuna-7B v1.1): its ``config.json`` must
        match ``config.text_config``; an embedding / LM head with fewer rows than
        ``text_config.vocab_size`` (Vicuna's 32000 vs LAVIS' 32000 + ``[PAD]``) is grown, each new
        row the mean of the existing rows (LAVIS initialises them at random), listed in
        ``LoadReport.resized``,
      - an HF InstructBLIP / SAM / delta directory or an in-memory InstructBLIP or SAM model
        (these also supply a configuration).
    Later sources win over earlier ones and ``path`` wins over all. The configuration is
    ``config`` (an InstructBlipConfig or SAMConfig, e.g. ``SAMConfig.instructblip_vicuna7b()``),
    else the first source's that has one; LAVIS files carry none. If ``path`` holds SAM keys
    (``one_2_muliple``, ``multiple_2_one``, ``attn``) it is the authors' checkpoint, which was
    trained with ``context_mode="shared"``: that mode is set, with a warning when the caller asked
    for another one (``context_mode=`` or ``config.context_mode``). The vision LayerNorm gets
    LAVIS' ``ln_vision`` eps 1e-5 (``config.post_layernorm_eps``) unless ``config`` sets
    ``post_layernorm_eps`` itself. With ``dtype=None`` and files of different floating dtypes
    (an fp16 ``eva_vit_g.pth`` with an fp32 Q-former file) every tensor is cast to float32.
    Errors (ValueError / FileNotFoundError, one line, naming the file): a file that is not a
    checkpoint or pickles more than ``weights_only=True`` allows (see
    ``torch_load_weights_only``), unknown keys (``strict=False``: a warning, keys in
    ``LoadReport.unexpected``), no source for a whole component (the ViT, the Q-former, the query
    tokens, the projection, the LLM), missing keys, shape mismatches, an LLM directory whose
    config differs from ``config.text_config``.

``torch_load_weights_only(path)``
    ``torch.load(weights_only=True)`` on CPU (memory-mapped for zip files) with one clear
    ValueError naming the file when it is not a checkpoint or pickles custom classes (it names
    them and how to re-save a trusted file's weights); nothing here unpickles arbitrary objects.
    Directories' ``pytorch_model.bin`` files are read through it too.

``save_trainable_delta(model, directory, base_reference) -> Path``
    Write ``config.json``, ``sam_delta.safetensors`` (``model.trainable_state_dict()`` only) and
    ``sam_delta.json`` = ``{"format": "sam_fast.trainable_delta", "version": 1, "base":
    base_reference, "keys": [...]}``. ``base_reference`` is a local directory (absolute, relative
    to the working directory, or relative to ``directory``) from which the frozen weights are read
    back: an HF InstructBLIP directory, a SAM directory or another delta directory.

``load_trainable_delta(cls, directory, base=None, *, dtype=None, device=None, copy=False,
return_report=False) -> SAM``
    Read the delta directory's config, take every other tensor from ``base`` (default: the
    recorded ``base_reference``; may also be a directory or an in-memory model), apply the delta.
    FileNotFoundError naming ``sam_delta.json`` when the base cannot be found.

``is_trainable_delta_dir(directory) -> bool``, ``read_state_dict(directory, *, dtype=None,
device=None) -> dict``, ``LoadReport`` (missing, unexpected, ignored, initialized, resized,
source), ``LAVIS_LN_VISION_EPS`` (1e-5).

Modules, one per checkpoint family over the shared machinery
-------------------------------------------------------------
``common`` (which modules SAM trains and adds, `LoadReport`, dtype plans, building a model from a
state dict), ``files`` (reading tensors: HF-style directories, ``torch_load_weights_only``),
``hf`` (HF InstructBLIP / SAM directories, in-memory models, trainable deltas), ``lavis`` (the
LAVIS key map, LAVIS / EVA / LLM sources, `from_lavis_checkpoint`), ``released`` (the authors' SAM
checkpoint: its module names and ``context_mode="shared"``). This package re-exports the public
names; they stay importable as ``sam_fast.models.loading.<name>``.
"""

from sam_fast.models.loading.common import NEW_MODULES, TRAINABLE_MODULES, LoadReport
from sam_fast.models.loading.files import read_state_dict, torch_load_weights_only
from sam_fast.models.loading.hf import (
    DELTA_INFO_NAME,
    DELTA_WEIGHTS_NAME,
    from_instructblip,
    is_trainable_delta_dir,
    load_trainable_delta,
    save_trainable_delta,
)
from sam_fast.models.loading.lavis import (
    IGNORED_LAVIS_KEYS,
    LAVIS_LN_VISION_EPS,
    from_lavis_checkpoint,
    is_ignored_lavis_key,
    lavis_to_sam_state_dict,
)

__all__ = [
    "NEW_MODULES",
    "TRAINABLE_MODULES",
    "IGNORED_LAVIS_KEYS",
    "DELTA_WEIGHTS_NAME",
    "DELTA_INFO_NAME",
    "LoadReport",
    "from_instructblip",
    "from_lavis_checkpoint",
    "lavis_to_sam_state_dict",
    "is_ignored_lavis_key",
    "save_trainable_delta",
    "load_trainable_delta",
    "is_trainable_delta_dir",
    "read_state_dict",
    "torch_load_weights_only",
    "LAVIS_LN_VISION_EPS",
]
