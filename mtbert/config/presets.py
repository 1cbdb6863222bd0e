"""Named presets: plain lists of overrides, applied before the user's own (``--preset NAME``).
One preset per method comes from the method registry (mtbert/methods/registry.py)."""

from mtbert.methods.registry import method_presets

PRESETS: dict[str, list[str]] = {
    "default": [],
    # Real CS224N files, packaged MiniLM, ~28 min on 2 CPU cores (README "Results"; found with
    # launch/sweeps/recipe30.yaml: trial 2). One 32-example batch of one task per step, drawn by
    # annealed sampling; layer-wise lr decay; the heads at 10x the encoder's top rate.
    "recipe": ["--data.dir=../shared/data/cs224n", "--train.out_dir=runs/recipe",
               "--train.epochs=3", "--train.epoch_steps=800", "--train.schedule=annealed", "--data.batch_size=32",
               "--train.lr=1.5e-4", "--train.layer_lr_decay=0.9", "--train.head_lr=1e-3",
               "--heads.sst.layers=2", "--heads.quora.kind=cross", "--heads.sts.kind=cosine",
               "--heads.sts.weight=5"],
    "frozen": ["--model.encoder=frozen", "--train.lr=1e-3"],
    **method_presets(),
}
