"""What a checkpoint and the data allow, checked before any work (each a ConfigError: one line
naming the field and the limit, exit 2). Without these, a batch with a sentence longer than the
checkpoint's positions failed deep inside the model (or positions were silently cut), a
tokenizer with more tokens than the embedding table indexed past it, and a global batch larger
than a task's training rows stopped the run mid-epoch with a traceback."""

from __future__ import annotations

from mtbert.errors import ConfigError


def check_checkpoint(cfg, bert_config, folder, head_kinds: dict[str, str]) -> None:
    """model.max_length against the checkpoint's positions; cross-encoder heads against its
    token-type vocabulary (the second sentence has type 1)."""
    positions = bert_config.max_position_embeddings
    if cfg.model.max_length > positions:
        raise ConfigError(f"model.max_length: {cfg.model.max_length} is more than the {positions} positions of "
                          f"{folder} (max_position_embeddings); use at most {positions}")
    for task, kind in head_kinds.items():
        if kind == "cross" and bert_config.type_vocab_size < 2:
            raise ConfigError(f"heads.{task}.kind: a cross-encoder needs 2 token types (sentence a, sentence b); "
                              f"{folder} has type_vocab_size {bert_config.type_vocab_size}; use a bi-encoder head")


def check_tokenizer(tokenizer, bert_config, folder) -> None:
    """Every token id the tokenizer can produce must index the checkpoint's embedding table."""
    if len(tokenizer) > bert_config.vocab_size:
        raise ConfigError(f"model.checkpoint: the tokenizer in {folder} has {len(tokenizer)} tokens, the model's "
                          f"embedding table {bert_config.vocab_size} (vocab_size); use the checkpoint's own "
                          f"tokenizer")


def check_batch(cfg, train_rows: dict[str, int], world: int) -> None:
    """Every global batch is whole (the sampler drops a short tail), so each trained task needs at
    least one global batch of rows."""
    global_batch = cfg.data.batch_size * world
    for task, rows in train_rows.items():
        if rows < global_batch:
            raise ConfigError(f"data.batch_size: a global batch of {global_batch} ({cfg.data.batch_size} x {world} "
                              f"process(es)) is larger than task {task}'s {rows} training examples"
                              f"{' (data.max_train)' if cfg.data.max_train else ''}; lower data.batch_size")
