"""PERSIA's contexts: ``TrainCtx`` (training), ``eval_ctx`` / ``EmbeddingCtx`` (evaluation),
``InferCtx`` (serving).

A PERSIA training script runs unchanged::

    with TrainCtx(model=model, embedding_optimizer=Adagrad(lr=1e-2),
                  dense_optimizer=torch.optim.SGD(model.parameters(), lr=0.1)) as ctx:
        loader = DataLoader(dataset, embedding_staleness=8)
        for batch in loader:
            output, labels = ctx.forward(batch)
            loss = loss_fn(output, labels[0])
            ctx.backward(loss)

(``examples/adult_income/train_local.py`` is the tested, complete version.)

In the embedded backend every role lives in this process: a ``TrainCtx`` starts a fresh set of
parameter-server shards (configured by ``embedding_config.yml`` / ``global_config.yml``, found
through the ``embedding_config_file`` / ``global_config_file`` arguments or PERSIA's
``PERSIA_EMBEDDING_CONFIG`` / ``PERSIA_GLOBAL_CONFIG`` environment variables); an ``eval_ctx``
uses the current or most recent one, as PERSIA's servers outlive a context.

The package's modules: ``_stack`` (the context stack: :class:`BaseCtx`, :func:`cnt_ctx`, the
most recent runtime), ``_contexts`` (:class:`DataCtx`, :class:`EmbeddingCtx`, :class:`TrainCtx`,
:func:`eval_ctx`, :class:`PreprocessMode`), ``_infer`` (:class:`InferCtx`: a read-only store
loaded from a checkpoint, for serving handlers) and ``_checkpoint`` (the checkpoint service of
:class:`EmbeddingCtx`: dump, load and wait of the dense state and the embeddings).
"""

from persia.ctx._contexts import DataCtx, EmbeddingCtx, PreprocessMode, TrainCtx, eval_ctx
from persia.ctx._infer import InferCtx
from persia.ctx._stack import BaseCtx, cnt_ctx

__all__ = [
    "PreprocessMode",
    "BaseCtx",
    "DataCtx",
    "EmbeddingCtx",
    "InferCtx",
    "TrainCtx",
    "eval_ctx",
    "cnt_ctx",
]
