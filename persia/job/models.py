"""Built-in dense models of ``persia train`` (``dnn``, ``dlrm``, ``dcn_v2``) and user models.

Every model is called as PERSIA calls one: ``model(non_id_tensors, embedding_tensors)``, where
``non_id_tensors`` is ``[]`` or ``[dense]`` (``(batch, num_dense)`` float32) and
``embedding_tensors`` holds one tensor per slot, in the job's slot order: ``(batch, dim)`` for
pooled slots, ``(batch, sample_fixed_size, dim + 1)`` for ``raw`` slots (the last channel is the
0/1 padding mask; the built-ins average the unmasked rows). Built-in models return logits.

A built-in is constructed as ``Class(num_dense, slot_dims, **model.args)``; a user model named
``package.module:Class`` as ``Class(**model.args)``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from persia.errors import ConfigError

__all__ = [
    "DNN",
    "DLRM",
    "DCNv2",
    "BUILTINS",
    "build_model",
    "uses_batch_norm",
    "batch_size_problem",
]


def _mlp(sizes: Sequence[int], last_activation: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if last_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _pooled(embeddings: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every embedding as ``(batch, dim)``: raw slots averaged over their unmasked rows."""
    out = []
    for e in embeddings:
        if e.dim() == 3:
            mask = e[:, :, -1:]
            out.append((e[:, :, :-1] * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0))
        else:
            out.append(e)
    return out


def _dense_input(non_id: list[torch.Tensor], batch: int, ref: torch.Tensor) -> torch.Tensor:
    if non_id:
        return non_id[0]
    return ref.new_zeros((batch, 0))


class DNN(nn.Module):
    """PERSIA's example network: a Linear + BatchNorm tower for the dense features, one for the
    concatenated embeddings, then an MLP (``hidden``) to one logit.

    Args:
        num_dense: dense features.
        slot_dims: embedding width of each slot.
        dense_size: output width of the dense tower.
        sparse_size: output width of the embedding tower.
        hidden: widths of the top MLP's hidden layers.
    """

    def __init__(
        self,
        num_dense: int,
        slot_dims: Sequence[int],
        dense_size: int = 16,
        sparse_size: int = 128,
        hidden: Sequence[int] = (256, 128),
    ) -> None:
        super().__init__()
        self.num_dense = num_dense
        self.dense_tower: nn.Module | None = None
        if num_dense:
            self.dense_tower = nn.Sequential(
                nn.Linear(num_dense, dense_size), nn.BatchNorm1d(dense_size)
            )
        self.sparse_tower = nn.Sequential(
            nn.Linear(sum(slot_dims), sparse_size), nn.BatchNorm1d(sparse_size)
        )
        width = sparse_size + (dense_size if num_dense else 0)
        self.top = _mlp([width, *hidden, 1], last_activation=False)

    def forward(
        self, non_id_tensors: list[torch.Tensor], embedding_tensors: list[torch.Tensor]
    ) -> torch.Tensor:
        parts = [self.sparse_tower(torch.cat(_pooled(embedding_tensors), dim=1))]
        if self.dense_tower is not None:
            parts.append(self.dense_tower(non_id_tensors[0]))
        return self.top(torch.cat(parts, dim=1))


class DLRM(nn.Module):
    """DLRM (Naumov et al. 2019): a bottom MLP on the dense features, pairwise dot products
    between it and every slot's embedding, then a top MLP to one logit.

    Slots whose dim differs from ``embedding_dim`` (default: the first slot's) are projected
    to it by a linear layer.

    Args:
        num_dense: dense features.
        slot_dims: embedding width of each slot.
        bottom: hidden widths of the bottom MLP (its output width is ``embedding_dim``).
        top: hidden widths of the top MLP.
        embedding_dim: the width all vectors are brought to for the dot products.
    """

    def __init__(
        self,
        num_dense: int,
        slot_dims: Sequence[int],
        bottom: Sequence[int] = (64,),
        top: Sequence[int] = (256, 128),
        embedding_dim: int | None = None,
    ) -> None:
        super().__init__()
        d = int(embedding_dim or slot_dims[0])
        self.dim = d
        self.bottom = _mlp([num_dense, *bottom, d]) if num_dense else None
        self.project = nn.ModuleList(
            [nn.Identity() if k == d else nn.Linear(k, d, bias=False) for k in slot_dims]
        )
        vectors = len(slot_dims) + (1 if num_dense else 0)
        rows, cols = torch.triu_indices(vectors, vectors, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        width = (d if num_dense else 0) + rows.numel()
        self.top = _mlp([width, *top, 1], last_activation=False)

    def forward(
        self, non_id_tensors: list[torch.Tensor], embedding_tensors: list[torch.Tensor]
    ) -> torch.Tensor:
        emb = [p(e) for p, e in zip(self.project, _pooled(embedding_tensors), strict=True)]
        vectors = emb
        head: list[torch.Tensor] = []
        if self.bottom is not None:
            x = self.bottom(non_id_tensors[0])
            vectors = [x, *emb]
            head = [x]
        stacked = torch.stack(vectors, dim=1)  # (batch, vectors, d)
        dots = torch.bmm(stacked, stacked.transpose(1, 2))
        rows: torch.Tensor = self.rows  # type: ignore[assignment]
        cols: torch.Tensor = self.cols  # type: ignore[assignment]
        pairs = dots[:, rows, cols]
        return self.top(torch.cat([*head, pairs], dim=1))


class DCNv2(nn.Module):
    """DCN-V2 (Wang et al. 2021): a cross network ``x_{l+1} = x0 * (W x_l + b) + x_l`` on the
    concatenated dense features and embeddings, and a deep MLP, stacked (cross then deep) or in
    parallel, then one logit.

    Args:
        num_dense: dense features.
        slot_dims: embedding width of each slot.
        cross_layers: number of cross layers.
        deep: hidden widths of the deep MLP.
        structure: ``"stacked"`` or ``"parallel"``.
    """

    def __init__(
        self,
        num_dense: int,
        slot_dims: Sequence[int],
        cross_layers: int = 3,
        deep: Sequence[int] = (256, 128),
        structure: str = "stacked",
    ) -> None:
        super().__init__()
        if structure not in ("stacked", "parallel"):
            raise ConfigError(
                f"model.args.structure: expected stacked or parallel, got {structure!r}"
            )
        width = num_dense + sum(slot_dims)
        self.structure = structure
        self.cross = nn.ModuleList([nn.Linear(width, width) for _ in range(cross_layers)])
        self.deep = _mlp([width, *deep])
        out = deep[-1] if deep else width
        if structure == "parallel":
            out += width
        self.head = nn.Linear(out, 1)

    def forward(
        self, non_id_tensors: list[torch.Tensor], embedding_tensors: list[torch.Tensor]
    ) -> torch.Tensor:
        emb = torch.cat(_pooled(embedding_tensors), dim=1)
        x0 = torch.cat([_dense_input(non_id_tensors, emb.shape[0], emb), emb], dim=1)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        if self.structure == "stacked":
            return self.head(self.deep(x))
        return self.head(torch.cat([x, self.deep(x0)], dim=1))


BUILTINS: dict[str, type[nn.Module]] = {"dnn": DNN, "dlrm": DLRM, "dcn_v2": DCNv2}


def _check_args(cls: type, args: Mapping[str, Any], skip: int, name: str) -> None:
    params = list(inspect.signature(cls).parameters.values())[skip:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    known = [p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    problems = [
        f"model.args.{k}: not an argument of {name}; expected one of {', '.join(known) or '(none)'}"
        for k in args
        if k not in known
    ]
    required = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        and p.name not in args
    ]
    problems += [f"model.args.{k}: required by {name}, got nothing" for k in required]
    if problems:
        raise ConfigError(problems)


def build_model(
    kind: str, args: Mapping[str, Any], num_dense: int, slot_dims: Sequence[int]
) -> nn.Module:
    """The job's model: a built-in, or ``package.module:Class`` built with ``args``.

    Raises:
        ConfigError: an unknown model, a class that cannot be imported or is not an
            ``nn.Module``, arguments it does not take, or a constructor that rejects them.
    """
    if kind in BUILTINS:
        cls: Any = BUILTINS[kind]
        _check_args(cls, args, 2, kind)
        try:
            return cls(num_dense, list(slot_dims), **args)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"model.args: {kind} rejected them: {exc}") from None
    module_name, _, class_name = kind.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model.type: cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"model.type: module {module_name!r} has no {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"model.type: expected a torch.nn.Module subclass, got {kind!r}")
    _check_args(cls, args, 0, kind)
    return cls(**args)


def uses_batch_norm(model: nn.Module) -> bool:
    """True if ``model`` has a batch-normalisation layer: it cannot train on one sample."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def batch_size_problem(model: nn.Module, kind: str, batch_size: int) -> str | None:
    """Why ``training.batch_size`` cannot train ``model``, or None."""
    if batch_size == 1 and uses_batch_norm(model):
        return (
            f"training.batch_size: 1 cannot train model {kind!r}: it uses batch normalisation, "
            "which needs at least 2 samples per batch"
        )
    return None
