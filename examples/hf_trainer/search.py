"""Search the LR strategy of examples/hf_trainer/train.py, without changing that script.

    python examples/hf_trainer/search.py [--quick]

`from_script` runs the script up to its `trainer.train()` and takes that Trainer; every trial
builds it again and trains it with the trial's optimizer and schedule, ASHA judging each epoch.
"""

import sys
from pathlib import Path

from lrsearch.integrations import transformers as lrs_hf

here = Path(__file__).resolve().parent
quick = "--quick" in sys.argv
make_trainer = lrs_hf.from_script(here / "train.py", "--num-train", "64" if quick else "256")

job = {
    "name": "hf-trainer-minilm",
    "space": {"family": "bert"},
    "search": {"num_trials": 4 if quick else 12, "max_epochs": 2 if quick else 3},
    "storage": {"path": str(here / "lrsearch-runs")},
}
result = lrs_hf.search(job, make_trainer, resume="--resume" in sys.argv)
print(f"best: {result.best.schedule} at max_lr {result.best.max_lr:.3g}: val accuracy {result.best.value:.3f}")
print("TrainingArguments:", {k: getattr(result.training_args, k) for k in
                             ("learning_rate", "lr_scheduler_type", "warmup_steps", "max_grad_norm")})
result.model.save_pretrained(here / "best-model")  # the best trial's weights
print(f"the best trial's model: {here / 'best-model'}")
