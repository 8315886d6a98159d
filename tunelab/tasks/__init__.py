"""What differs per task; the training loop (tunelab/train.py) is shared by all of them.

A task is a module with the same few functions, which the recipe in `train.py` calls:

    resolve_source(name)                       model name -> what from_pretrained loads (task defaults)
    build_data(config, tokenizer)              records -> the run's train/eval sets, which plan and
                                               collate batches (epoch_plan, num_batches, collate,
                                               eval_batches, summary)
    load_model(source, *, data, tokenizer, **loading)   the base model with the task's head
    PEFT_TASK_TYPE                             what PEFT wraps (which modules it trains besides adapters)
    loss_module(model, probe=, say=)           an nn.Module (probe: one real batch for start-up checks): forward(**batch) -> (summed loss, target count);
                                               its `count_targets(batch)` gives the count before the
                                               forward pass, so the loop normalises per target
                                               across accumulation and processes
    TARGETS, RATE_UNIT                         what the loss averages over, for progress and summaries
    describe_eval_loss(loss)                   the eval line ("eval loss ... perplexity ..." for causal_lm)
    run_meta(data)                             what inference needs besides weights (saved in tunelab_model.json)
    final_scores(model, data, ...)             the task's metrics on the eval set, merged into eval.json

Precision, accumulation, clipping, schedule, checkpoints, resume, logging and the run folder
do not know which task runs. `causal_lm` wraps today's chat-rendered data, `TargetTokenLoss`
and perplexity; `classification` is sequence classification. Preference tuning (DPO) fits
the same seam: pairs as batches, a loss over chosen/rejected log-probabilities that counts
pairs, reward accuracy as its metric.
"""

from __future__ import annotations

from types import ModuleType

TASKS = ("causal_lm", "classification")


def task_module(name: str) -> ModuleType:
    """The module implementing a task named in the config (`task:`)."""
    from tunelab.tasks import causal_lm, classification

    return classification if name == "classification" else causal_lm
