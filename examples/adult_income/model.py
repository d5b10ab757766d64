"""PERSIA's Adult-example network: a Linear+BatchNorm tower for the dense features, one for the
concatenated embeddings, then 256-128-1 (ReLU added between the top layers)."""

from __future__ import annotations

import torch
from torch import nn


class DNN(nn.Module):
    def __init__(
        self,
        dense_features: int = 5,
        embedding_width: int = 64,
        dense_mlp_output_size: int = 16,
        sparse_mlp_output_size: int = 128,
    ) -> None:
        super().__init__()
        self.dense_mlp = nn.Linear(dense_features, dense_mlp_output_size)
        self.dense_bn = nn.BatchNorm1d(dense_mlp_output_size)
        self.sparse_mlp = nn.Linear(embedding_width, sparse_mlp_output_size)
        self.sparse_bn = nn.BatchNorm1d(sparse_mlp_output_size)
        self.top = nn.Sequential(
            nn.Linear(dense_mlp_output_size + sparse_mlp_output_size, 256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, 1),
        )

    def forward(
        self, non_id_tensors: list[torch.Tensor], embedding_tensors: list[torch.Tensor]
    ) -> torch.Tensor:
        dense = self.dense_bn(self.dense_mlp(non_id_tensors[0]))
        sparse = self.sparse_bn(self.sparse_mlp(torch.cat(embedding_tensors, dim=1)))
        return torch.sigmoid(self.top(torch.cat([sparse, dense], dim=1)))
