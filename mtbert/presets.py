"""Named presets: plain lists of overrides, applied before the user's own (``--preset NAME``).
One preset per method comes from the method registry (mtbert/methods/registry.py)."""

from mtbert.methods.registry import method_presets

PRESETS: dict[str, list[str]] = {
    "default": [],
    # Real CS224N files, packaged MiniLM, ~30 min on 2 CPU cores (README "Results").
    "recipe": ["--data.dir=../shared/data/cs224n", "--train.out_dir=runs/recipe",
               "--train.epochs=3", "--train.epoch_steps=240", "--data.batch_size=32", "--train.lr=1e-4",
               "--heads.sst.layers=2", "--heads.quora.kind=cross", "--heads.sts.kind=cosine",
               "--heads.sts.weight=5", "--method.arrp_batches=50"],
    "frozen": ["--model.encoder=frozen", "--train.lr=1e-3"],
    **method_presets(),
}
