"""Checks of a job beyond its schema: the data (``--data``) and the model's arguments."""

from __future__ import annotations

import os

from persia.errors import ConfigError
from persia.job.config import JobConfig, load_job

__all__ = ["check_data", "check_files", "check_model", "validate_job"]


def check_data(job: JobConfig) -> list[str]:
    """Problems of the job's data files (what ``persia train`` checks before training): files
    named by their field, columns, rows, label classes and dense values of the training files,
    a parsed sample of each split (see :meth:`persia.job.readers.JobReader.check`)."""
    from persia.job.readers import JobReader

    return JobReader(job.data, stats=None).check()


def check_files(job: JobConfig) -> list[str]:
    """Problems of the job's file patterns alone: each must match at least one file."""
    problems: list[str] = []
    sources = [("data.train", job.data.train)]
    if job.data.test is not None:
        sources.append(("data.test", job.data.test))
    for where, source in sources:
        try:
            files = source.files()
        except ConfigError as exc:
            problems.extend(f"{where}: {p}" for p in exc.problems)
            continue
        if not files:
            problems.append(f"{where}: no files (the patterns match only directories)")
    return problems


def check_model(job: JobConfig) -> list[str]:
    """Problems building the job's model (unknown or missing arguments, import errors)."""
    from persia.job.models import batch_size_problem, build_model

    try:
        model = build_model(
            job.model.type,
            job.model.args,
            len(job.data.dense),
            [s.dim for s in job.embedding.slots],
        )
    except ConfigError as exc:
        return list(exc.problems)
    problem = batch_size_problem(model, job.model.type, job.training.batch_size)
    return [problem] if problem else []


def validate_job(
    path: str | os.PathLike,
    overrides: list[str] | None = None,
    *,
    data: bool = False,
    model: bool = True,
) -> JobConfig:
    """Loads and checks a job; one :class:`ConfigError` lists every problem found.

    The schema is checked first (its problems are raised alone, since the later checks need a
    valid job); then the model and the data files (that every pattern matches a file; with
    ``data``, their contents too), whose problems are raised together.
    """
    job = load_job(path, overrides)
    problems: list[str] = []
    if model:
        problems += check_model(job)
    problems += check_data(job) if data else check_files(job)
    if problems:
        raise ConfigError(problems, source=str(path))
    return job
