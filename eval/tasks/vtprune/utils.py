"""Shared code of vtprune's offline lmms-eval tasks.

The tasks read JSON lines and images from the directory named by ``VTPRUNE_EVAL_DATA`` (written by
``scripts/make_eval_data.py``); ``LocalJsonTask`` expands that variable in ``dataset_kwargs.data_files``,
which lmms-eval passes to ``datasets.load_dataset("json", ...)`` as it is.
"""

import os
import re
from pathlib import Path

from lmms_eval.api.task import ConfigurableTask
from loguru import logger
from PIL import Image

DATA_VARIABLE = "VTPRUNE_EVAL_DATA"
TASK_LOGGER = ConfigurableTask.__module__  # lmms-eval's tasks log through loguru under their module's name


def data_dir() -> Path:
    value = os.environ.get(DATA_VARIABLE)
    if not value:
        raise RuntimeError(f"set {DATA_VARIABLE} to the directory written by scripts/make_eval_data.py")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{DATA_VARIABLE}={value!r} is not a directory (run scripts/make_eval_data.py)")
    return path


def _expand(value):
    if isinstance(value, str):
        return (
            str(data_dir() / value.replace(f"${DATA_VARIABLE}/", "", 1))
            if value.startswith(f"${DATA_VARIABLE}")
            else value
        )
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


class LocalJsonTask(ConfigurableTask):
    """A ConfigurableTask whose ``data_files`` may start with ``$VTPRUNE_EVAL_DATA/``."""

    def __init__(self, config=None, **kwargs):
        config = {k: v for k, v in dict(config).items() if k != "class"}
        dataset_kwargs = dict(config.get("dataset_kwargs") or {})
        dataset_kwargs["data_files"] = _expand(dataset_kwargs.get("data_files"))
        config["dataset_kwargs"] = dataset_kwargs
        # ConfigurableTask warns once per answer choice that neither the empty target_delimiter nor the
        # choice starts with whitespace. Here that is by design (the chat prompt ends in a newline, so
        # "circle" follows it directly), and 13 such lines per run bury the warnings that matter.
        logger.disable(TASK_LOGGER)
        try:
            super().__init__(config=config, **kwargs)
        finally:
            logger.enable(TASK_LOGGER)


def doc_to_visual(doc):
    with Image.open(data_dir() / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


# --- yes/no (POPE-style) --------------------------------------------------------------------------
def _yes_no(text: str) -> str:
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words and words[0] in ("yes", "no") else "other"


def yes_no_process_results(doc, results):
    prediction, truth = _yes_no(results[0]), doc["answer"]
    record = {"prediction": prediction, "truth": truth}
    return {name: record for name in ("accuracy", "precision", "recall", "f1", "yes_ratio")}


def _confusion(records):
    tp = sum(r["prediction"] == "yes" and r["truth"] == "yes" for r in records)
    fp = sum(r["prediction"] == "yes" and r["truth"] == "no" for r in records)
    fn = sum(r["prediction"] != "yes" and r["truth"] == "yes" for r in records)
    return tp, fp, fn


def aggregate_accuracy(records):
    return sum(r["prediction"] == r["truth"] for r in records) / len(records)


def aggregate_precision(records):
    tp, fp, _ = _confusion(records)
    return tp / (tp + fp) if tp + fp else 0.0


def aggregate_recall(records):
    tp, _, fn = _confusion(records)
    return tp / (tp + fn) if tp + fn else 0.0


def aggregate_f1(records):
    precision, recall = aggregate_precision(records), aggregate_recall(records)
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def aggregate_yes_ratio(records):
    return sum(r["prediction"] == "yes" for r in records) / len(records)


# --- multiple choice ---------------------------------------------------------------------------------
LETTERS = "ABCDEFGH"


def mc_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    options = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(doc["options"]))
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{doc['question']}\n{options}{kwargs.get('post_prompt', '')}"


def mc_doc_to_choice(doc):
    return list(LETTERS[: len(doc["options"])])


# --- easy-vqa (the real-weights proxy's questions) ------------------------------------------------
def easyvqa_doc_to_choice(doc):
    return list(doc["choices"])


def easyvqa_process_results(doc, results):
    """``results``: one (log-likelihood, greedy) pair per choice; the best choice is the answer."""
    scores = [ll for ll, _ in results]
    prediction = doc["choices"][max(range(len(scores)), key=scores.__getitem__)]
    right = float(prediction == doc["answer"])
    by_kind = {f"accuracy_{kind}": right for kind in ("shape", "colour") if doc["kind"] == kind}
    image_reading = {"image_reading_accuracy": right} if doc["kind"] in ("shape", "colour") else {}
    return {"accuracy": right, **image_reading, **by_kind}
