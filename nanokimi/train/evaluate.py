"""`nanokimi eval`: validation loss and bits per byte of a checkpoint."""
import hashlib
import math
from pathlib import Path

import torch

from nanokimi.checkpoint import TOKENIZER, CheckpointError, load_trainer_state, resolve_checkpoint
from nanokimi.infer.sample import load_for_sampling
from nanokimi.train.trainer import evaluate


def evaluate_checkpoint(ckpt: str, data: str | None, batches: int, batch_size: int, seq_len: int) -> dict:
    """Loss and bits per byte of a checkpoint: on its run's validation split, on the validation split of a
    prepared folder `data`, or on all of a source `data` (up to `batches` batches spread over it)."""
    from nanokimi.data import Manifest, iter_eval, prepare

    path = resolve_checkpoint(ckpt)
    model, _ = load_for_sampling(str(path))
    tokenizer_file = path / TOKENIZER
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{path} has no {TOKENIZER} (a tiktoken-format checkpoint?); nanokimi eval scores data "
                              f"tokenised with a {TOKENIZER}: use nanokimi eval --task for this checkpoint.")
    device = next(model.parameters()).device
    if data is None:
        try:
            data_dir = Path(load_trainer_state(path)["data_dir"])
        except CheckpointError as e:
            raise CheckpointError(f"{e} Without it, name the data to score: --data FOLDER_OR_SOURCE.") from None
        splits = ["val"]
    elif (Path(data) / "manifest.json").is_file():
        data_dir, splits = Path(data), ["val"]
    else:
        data_dir, splits = Path(data.rstrip("/") + ".nanokimi-eval"), ["train", "val"]
        prepare(data, data_dir, tokenizer_path=tokenizer_file, refresh_changed_source=True, progress=False)
    manifest = Manifest.load(data_dir)
    ours = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    if manifest.tokenizer.get("sha256") != ours and not _same_tokenizer(tokenizer_file, data_dir / "tokenizer.json"):
        raise CheckpointError(f"{data_dir} was tokenised with another tokenizer than {tokenizer_file} (sha256 "
                              f"{str(manifest.tokenizer.get('sha256'))[:12]}... vs {ours[:12]}...): its scores would "
                              "mean nothing. Give the source itself (--data FILE_OR_FOLDER) and it is tokenised with "
                              "the checkpoint's tokenizer.")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else \
        (lambda: torch.autocast("cpu", enabled=False))
    loss_sum, token_sum, byte_sum = 0.0, 0, 0
    for split in splits:  # all of a source: each split weighted by its tokens
        info = manifest.splits[split]
        if info.tokens < seq_len + 1:
            continue
        share = max(1, round(batches * info.tokens / sum(manifest.splits[s].tokens for s in splits)))
        stream = iter_eval(data_dir, split, batch_size, seq_len, share, device=device)
        result = evaluate(model, stream, manifest.bytes_per_token(split), autocast)
        loss_sum += result["val_loss"] * info.tokens
        token_sum += info.tokens
        byte_sum += info.bytes
    if not token_sum:
        raise CheckpointError(f"{data_dir} has too few tokens for one window of --seq-len {seq_len} + 1; use a "
                              "smaller --seq-len or more data.")
    loss = loss_sum / token_sum
    return {"checkpoint": str(path), "data": str(data_dir),
            "scored": "validation split" if splits == ["val"] else "the whole source (train and validation splits)",
            "val_loss": loss, "val_bpb": loss / math.log(2) / (byte_sum / token_sum)}


def _same_tokenizer(a: Path, b: Path) -> bool:
    """Equal vocabularies and merges, whatever the JSON formatting of the two files."""
    from nanokimi.data import DataError, Tokenizer

    try:
        return Tokenizer.load(a).sha256() == Tokenizer.load(b).sha256()
    except DataError:
        return False
