"""`layerpack inspect`: a readable summary of a pack, from its manifest alone."""
from __future__ import annotations

from layerpack_runtime.manifest import Manifest


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _quality(q: dict) -> str:
    # The manifest was validated (types of the fields present); a newer writer may leave some out.
    if q.get("perplexity") is None:
        return "quality:       (not measured)"
    line = f"quality:       perplexity {q['perplexity']:.4f} on {q.get('tokens', '?')} tokens of {(q.get('text') or '?').split(' (')[0]}"
    if q.get("kl") is not None and q.get("top1_agreement") is not None:
        line += f"; KL {q['kl']:.5f}, top-1 agreement {100 * q['top1_agreement']:.2f}% vs {q.get('reference')}"
    return line


def summarize(m: Manifest, top_errors: int = 8) -> str:
    # The manifest was validated (layerpack_runtime.validate): fields are of their types; optional ones may be absent.
    a, q, t = m.architecture, m.quantization, m.totals
    rope = a.get("rope") or {}
    sizes = {f.path: f.size for f in m.files}
    lines = [
        f"format:        layerpack {m.format_version} (written by {m.created_by})",
        f"source:        {m.source['kind']} {m.source['id']}" + (f" @ {m.source['revision']}" if m.source.get("revision") else ""),
        f"architecture:  {a['family']} ({a.get('hf_architecture')}), {a['num_layers']} layers, hidden {a['hidden_size']}, "
        f"ffn {a['intermediate_size']}, heads {a['num_heads']}/{a.get('num_kv_heads') or a['num_heads']} kv, head_dim {a.get('head_dim') or a['hidden_size'] // a['num_heads']}, vocab {a['vocab_size']}"
        + (f"; {a['moe']['num_experts']} experts (ffn {a['moe']['intermediate_size']}), top-{a['moe']['top_k']} routing, "
           f"in {len(a['moe']['layers'])} of {a['num_layers']} blocks" if a.get("moe") else ""),
        f"rope:          {rope.get('type', 'default')} theta={rope.get('theta', 10000.0):g}" + (f" scaling={rope['scaling']}" if rope.get("scaling") else "")
        + f"; tied embeddings: {'yes' if a.get('tie_word_embeddings') else 'no'}",
        f"quantization:  {q.scheme}" + (f" block {q.block_size}" if q.block_size else "") + f", dtype {q.dtype}"
        + (f", outliers {q.outlier_fraction:g}" + (f" ({q.outlier_rule})" if q.outlier_rule else "") if q.outlier_fraction else "")
        + (f", head outliers {q.head_outlier_fraction:g}" if q.head_outlier_fraction is not None else "") + f", compression {q.compression}"
        + (", embedding quantized (tied head)" if q.quantized_embedding else ""),
        f"size:          {t['params'] / 1e6:.1f} M params, {_size(t['layer_bytes'])} of layers, "
        f"{t['layer_bytes'] / t['params']:.3f} bytes/param ({t['bits_per_param']:.2f} bits)",
        *([_quality(m.quality)] if m.quality else []),
        "",
        f"{'layer':<12}{'params':>12}{'size':>12}{'bits/param':>12}{'max rel err':>13}",
    ]
    for layer in m.layers:
        size = sizes.get(layer.file, 0)
        err = max((x.rel_rms_error for x in layer.tensors), default=0.0)
        note = "  (+ the tied embedding)" if layer.kind == "head" and a.get("tie_word_embeddings") else ""
        lines.append(f"{layer.name:<12}{layer.params:>12,}{_size(size):>12}{8 * size / max(layer.params, 1):>12.2f}{err:>13.2e}{note}")
    worst = sorted(((x.rel_rms_error, l.name, x) for l in m.layers for x in l.tensors if x.scheme != "none" or x.rel_rms_error), key=lambda r: -r[0])
    if worst:
        lines += ["", "largest quantization errors (relative RMS vs source):"]
        for err, lname, x in worst[:top_errors]:
            lines.append(f"  {lname:<10} {x.name:<18} {x.scheme:<5} {err:.3e}" + (f"  ({x.outliers} outliers kept)" if x.outliers else ""))
    return "\n".join(lines)
