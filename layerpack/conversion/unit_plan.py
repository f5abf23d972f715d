"""Which unit and canonical name every source tensor becomes, and which scheme each is stored in."""
from __future__ import annotations

from dataclasses import dataclass, field

from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import SCHEME_NONE, UNIT_BLOCK, UNIT_EMBED, UNIT_HEAD, unit_name
from layerpack_runtime.models import contract, family_of_pack

from ..families import Family, Rows, is_ignored, split_rows
from ..source import Part, base_name


@dataclass
class UnitPlan:
    name: str
    kind: str
    index: int | None
    tensors: dict[str, str | Part]   # canonical -> HF name (or a part of a fused HF tensor)
    rows: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # canonical -> (start, stop, rows) of a fused HF tensor


def plan_units(family: Family, arch: dict, names: list[str]) -> list[UnitPlan]:
    """Map every source tensor to (unit, canonical name). Missing weights and unknown extra tensors
    are errors: silently dropping a weight would make a pack that runs and is wrong."""
    present = set(names)
    used: set[str] = set()

    rows: dict[int | None, dict[str, tuple[int, int, int]]] = {}

    def take(table: dict[str, str | Rows], optional: dict[str, str], i: int | None) -> dict[str, str]:
        out = {}
        for canonical, pattern in table.items():
            if isinstance(pattern, Rows):
                rows.setdefault(i, {})[canonical] = split_rows(pattern.part, arch)
                pattern = pattern.pattern
            hf = pattern.format(i=i)
            if hf not in present:
                raise LayerpackError(f"source lacks tensor {hf} required by the {family.name} family (config.json: num_hidden_layers={arch['num_layers']})")
            out[canonical] = hf
        for canonical, pattern in optional.items():
            hf = pattern.format(i=i)
            if hf in present and canonical not in out:
                out[canonical] = hf
        used.update(out.values())
        return out

    def block(i: int) -> dict:
        if not family.moe:
            return take(family.block, family.optional, i)
        if i not in arch["moe"]["layers"]:
            return take({**family.block, **family.dense_mlp}, family.optional, i)
        return {**take(family.block, family.optional, i), **experts(i)}

    def experts(i: int) -> dict:
        """Block i's router and per-expert weights, from whichever naming scheme the source uses."""
        tables = list(family.moe.values())
        table = next((t for t in tables if _source_name(t["moe.experts.{j}.gate.weight"], i, 0) in present), tables[0])
        out = {}
        for j in range(arch["moe"]["num_experts"]):
            for canonical, src in table.items():
                ref = _source_ref(src, i, j)
                hf = base_name(ref)
                if hf not in present:
                    raise LayerpackError(f"source lacks tensor {hf} required by the {family.name} family (config.json: num_hidden_layers={arch['num_layers']})")
                out[canonical.format(j=j)] = ref
                used.add(hf)
        return out

    tied = arch["tie_word_embeddings"]
    head_table = {k: v for k, v in family.head.items() if not (tied and k == "head.weight")}
    units = [UnitPlan(UNIT_EMBED, UNIT_EMBED, None, take(family.embed, {}, None))]
    units += [UnitPlan(unit_name(UNIT_BLOCK, i), UNIT_BLOCK, i, block(i), rows.get(i, {})) for i in range(arch["num_layers"])]
    units.append(UnitPlan(UNIT_HEAD, UNIT_HEAD, None, take(head_table, {}, None)))
    if tied:
        used.add(family.head["head.weight"])  # a tied checkpoint may still carry a copy; it is the embedding
    extra = sorted(n for n in present - used if not is_ignored(n))
    if extra:
        raise LayerpackError(
            f"source has {len(extra)} tensor(s) the {family.name} family does not use, e.g. {extra[0]} "
            f"(does config.json num_hidden_layers={arch['num_layers']} match the weights?)"
        )
    return units


def _source_ref(src, i: int, j: int):
    """An expert table entry (see families._MIXTRAL_MOE) for block i, expert j: an HF name, or a Part
    of a fused HF tensor."""
    if isinstance(src, tuple):
        pattern, part = src
        return Part(pattern.format(i=i), j, {"gate": 0, "up": 1, "expert": None}[part])
    return src.format(i=i, j=j)


def _source_name(src, i: int, j: int) -> str:
    return base_name(_source_ref(src, i, j))


def scheme_for(canonical: str, quant: str, arch: dict) -> str:
    """The pack's scheme for a tensor its family declares quantizable under `arch`, else none: the
    family contract's rule (models/contract.py, `quantizable`), which the reader checks too
    (validate/layer_entries.py). Linear weights always; norms, biases and routers never; the
    embedding only when tied (`quantizable="tie_word_embeddings"`: it is then read in full as the
    head every token; untied, only a few rows are gathered per token, so it stays exact)."""
    if quant == SCHEME_NONE:
        return SCHEME_NONE
    return quant if contract.is_quantizable(family_of_pack(arch["family"]), canonical, arch) else SCHEME_NONE