"""One rank of tests/test_tensor_parallel.py (started by torchrun): loads each saved model (its Auto class by its architecture) with ``tp_plan="auto"``
(transformers starts the gloo group from torchrun's environment), runs the given ids, and rank 0 saves the logits.

    torchrun --nproc_per_node 2 tests/tensor_parallel_worker.py OUT_DIR MODEL_DIR [MODEL_DIR ...]
"""

import os
import sys

import torch
import torch.distributed as dist

import modeling_longnet  # noqa: F401  (registers LongNet with the Auto classes)
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

AUTO_CLASSES = {
    "LongNetModel": AutoModel,
    "LongNetForCausalLM": AutoModelForCausalLM,
    "LongNetForSequenceClassification": AutoModelForSequenceClassification,
}

try:  # transformers >= 5.18 takes the plan in a DistributedConfig
    from transformers import DistributedConfig

    TENSOR_PARALLEL = {"distributed_config": DistributedConfig(tp_plan="auto")}
except ImportError:
    TENSOR_PARALLEL = {"tp_plan": "auto"}


def main():
    out_dir, model_dirs = sys.argv[1], sys.argv[2:]
    ids = torch.load(os.path.join(out_dir, "ids.pt"))
    for index, model_dir in enumerate(model_dirs):
        auto_class = AUTO_CLASSES[AutoConfig.from_pretrained(model_dir).architectures[0]]
        model = auto_class.from_pretrained(model_dir, attn_implementation="torch", **TENSOR_PARALLEL).eval()
        q_weight = model.base_model.layers[0].self_attn.q_proj.weight
        with torch.no_grad():
            out = model(ids)
            logits = out.last_hidden_state if auto_class is AutoModel else out.logits
        if int(os.environ["RANK"]) == 0:
            sharded = getattr(q_weight, "to_local", lambda: q_weight)().shape[0]
            torch.save({"logits": logits.detach(), "q_rows_per_rank": sharded}, os.path.join(out_dir, f"logits_{index}.pt"))
    dist.destroy_process_group()  # else the gloo group keeps the process from exiting


if __name__ == "__main__":
    main()
