"""Hugging Face ``datasets`` as a task source (e.g. GLUE qqp / stsb, SetFit/sst5).

    --data.tasks=sts --task_defs.sts... is not needed for built-ins; for a hub task:
    --task_defs.stsb.source=hub --task_defs.stsb.hub_name=glue --task_defs.stsb.hub_config=stsb
    --task_defs.stsb.kind=pair_regression --task_defs.stsb.label_max=5
    --task_defs.stsb.train=train --task_defs.stsb.dev=validation
    --task_defs.stsb.columns=id:idx,text_a:sentence1,text_b:sentence2,label:label

Needs the network (or a warm datasets cache). Rows are checked like the CS224N files.
"""

from __future__ import annotations

from mtbert.data.cs224n import DataError, Example, LoadReport, parse_label


def read_hub(spec, split: str, labeled: bool = True, skip_bad_rows: bool = False, load_dataset=None):
    """-> (list[Example], LoadReport) for one split of ``spec.hub``. ``load_dataset`` is injectable for tests."""
    if load_dataset is None:
        from datasets import load_dataset
    name, config = spec.hub
    where = f"hub:{name}/{config}:{split}"
    try:
        ds = load_dataset(name, config or None, split=split)
    except Exception as e:
        raise DataError(f"{where}: cannot load ({type(e).__name__}: {e})") from None
    report = LoadReport(where)
    roles = ["text_a"] + (["text_b"] if spec.pair else []) + (["label"] if labeled else [])
    for role in roles:
        if spec.columns[role] not in ds.column_names:
            raise DataError(f"{where}: missing column {spec.columns[role]!r} for {role}; columns {ds.column_names}")
    examples, id_col = [], spec.columns.get("id")
    for i, row in enumerate(ds):
        label = None
        if labeled:
            raw = row[spec.columns["label"]]
            if raw is None or raw == "" or raw == -1:  # GLUE test splits use -1
                report.skipped_empty_label += 1
                continue
            try:
                label = parse_label(str(raw), spec)
            except ValueError as e:
                if not skip_bad_rows:
                    raise DataError(f"{where}: row {i}: {e}") from None
                report.skipped_bad["bad label"] = report.skipped_bad.get("bad label", 0) + 1
                continue
        ex_id = str(row[id_col]) if id_col and id_col in row else str(i)
        texts = [row[spec.columns[r]] for r in (("text_a", "text_b") if spec.pair else ("text_a",))]
        texts = ["" if t is None else str(t).strip() for t in texts]
        if not all(texts):
            if not skip_bad_rows:
                raise DataError(f"{where}: row {i}: empty sentence; fix the data or set data.skip_bad_rows=true")
            report.skipped_bad["empty sentence"] = report.skipped_bad.get("empty sentence", 0) + 1
            continue
        examples.append(Example(ex_id, texts[0], texts[1] if spec.pair else None, label))
    report.rows = len(examples)
    return examples, report
