"""The data report: what prepare produced (documents, tokens, chars/token, skipped rows, the token_count check), read
from a manifest. Printed by `python -m fwray.prepare`, written and logged by a run; its figures are the metrics of the
nested `prepare` run. Pure: no ray or mlflow, so tracking and run import it without Ray Data."""
from __future__ import annotations

DATA_REPORT = "data_report.txt"  # its file name in the run folder and among the artifacts


def data_report(manifest: dict) -> str:
    """Documents, tokens and chars/token per split, skipped rows and the token_count check, from a manifest."""
    splits = manifest["splits"]
    total_docs = sum(s["documents"] for s in splits.values())
    total_tokens = sum(s["tokens"] for s in splits.values())
    fp = manifest.get("fingerprint", "?")[:16]
    lines = [f"data report (fingerprint {fp}, tokenizer {manifest.get('tokenizer')})"]
    for name, s in splits.items():
        lines.append(f"  {name:5s} {s['documents']:>12,} documents {s['tokens']:>15,} tokens "
                     f"in {len(s['files'])} files" + (f", {s['bytes']:,} bytes of text" if "bytes" in s else ""))
    lines.append(f"  total {total_docs:>12,} documents {total_tokens:>15,} tokens (EOT before each document)")
    chars = manifest.get("chars")
    if chars is not None:
        lines.append(f"  {chars:,} characters, {chars / max(total_tokens - total_docs, 1):.2f} chars/token "
                     f"(EOT not counted)")
    skipped = manifest.get("skipped", {})
    lines.append(f"  skipped rows: {sum(skipped.values()):,}"
                 + (f" ({', '.join(f'{k} {v:,}' for k, v in skipped.items())})" if skipped else ""))
    check = manifest.get("token_count")
    if check:
        verdict = "matches" if check["matches"] else f"MISMATCH: {check['produced_without_eot']:,} produced"
        lines.append(f"  token_count column sums to {check['column_sum']:,} ({verdict})")
    if "val_fraction" in manifest:
        lines.append(f"  split: val_fraction {manifest['val_fraction']} by {manifest.get('split_rule', 'hash of id')}")
    if "seconds" in manifest:
        lines.append(f"  prepared in {manifest['seconds']:.1f} s")
    for f in manifest.get("inputs", []):
        lines.append(f"  input: {f.get('path', f)}")
    return "\n".join(lines) + "\n"


def data_metrics(manifest: dict) -> dict[str, float]:
    """The manifest's figures as metrics of the prepare run."""
    out: dict[str, float] = {}
    for name, s in manifest["splits"].items():
        out[f"{name}_documents"] = s["documents"]
        out[f"{name}_tokens"] = s["tokens"]
        out[f"{name}_files"] = len(s["files"])
        if "bytes" in s:  # UTF-8 bytes of the split's text (manifests of fwray.prepare version 2 on)
            out[f"{name}_bytes"] = s["bytes"]
    docs = sum(s["documents"] for s in manifest["splits"].values())
    toks = sum(s["tokens"] for s in manifest["splits"].values())
    if manifest.get("chars") is not None:
        out["chars"] = manifest["chars"]
        out["chars_per_token"] = manifest["chars"] / max(toks - docs, 1)
    for k, v in manifest.get("skipped", {}).items():
        out[f"skipped_{k}"] = v
    if "seconds" in manifest:
        out["seconds"] = manifest["seconds"]
    return out
