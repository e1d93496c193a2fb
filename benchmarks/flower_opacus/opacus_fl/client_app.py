# mypy: ignore-errors
# (upstream's untyped example code, kept as it is; see ../README.md)
# Copyright 2025 Flower Labs GmbH. All Rights Reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
# ==============================================================================
#
# Modified for fedvault's benchmark (benchmarks/vs_flower_opacus.py), from Flower's
# examples/opacus/opacus_fl/client_app.py at adap/flower
# fdef7afb1dca3030553be302366cfd285ed6632c:
# - the noise multiplier comes from the run config (`noise-multiplier`) for every site,
#   instead of 1.0 / 1.5 by partition parity, so that both sides of the benchmark train
#   with the same sigma. Nothing else is changed.
"""opacus: Training with Sample-Level Differential Privacy using Opacus Privacy Engine."""

import warnings

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from opacus import PrivacyEngine
from opacus_fl.task import Net, load_data, test, train

warnings.filterwarnings("ignore", category=UserWarning)


app = ClientApp()


def _device() -> torch.device:
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def _partition_loaders(context: Context):
    pid = context.node_config["partition-id"]
    n = context.node_config["num-partitions"]
    noise = float(context.run_config["noise-multiplier"])
    train_loader, test_loader = load_data(partition_id=pid, num_partitions=n)
    return pid, noise, train_loader, test_loader


def _unwrap_state_dict(model: torch.nn.Module) -> dict:
    # NOTE: this is to return plain or unwrapped state_dict even if Opacus wrapped the model.
    return (
        model._module.state_dict() if hasattr(model, "_module") else model.state_dict()
    )


@app.train()
def train_message(msg: Message, context: Context) -> Message:
    pid, noise_multiplier, train_loader, _ = _partition_loaders(context)
    device = _device()

    target_delta = float(context.run_config["target-delta"])
    max_grad_norm = float(context.run_config["max-grad-norm"])

    model = Net().to(device)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)

    privacy_engine = PrivacyEngine(secure_mode=False)
    private_model, optimizer, private_train_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
    )

    epsilon = train(
        private_model,
        private_train_loader,
        privacy_engine,
        optimizer,
        target_delta,
        device=device,
        epochs=1,
    )

    out_arrays = ArrayRecord(_unwrap_state_dict(private_model))
    out_metrics = MetricRecord(
        {
            "num-examples": len(private_train_loader.dataset),
            "epsilon": float(epsilon),
            "target_delta": float(target_delta),
            "noise_multiplier": float(noise_multiplier),
            "max_grad_norm": float(max_grad_norm),
        }
    )

    print(
        f"[client {pid}] epsilon(delta={target_delta})={epsilon:.2f}, noise={noise_multiplier}"
    )

    return Message(
        content=RecordDict({"arrays": out_arrays, "metrics": out_metrics}),
        reply_to=msg,
    )


@app.evaluate()
def evaluate_message(msg: Message, context: Context) -> Message:
    pid, _, _, test_loader = _partition_loaders(context)
    device = _device()

    model = Net().to(device)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)

    loss, accuracy = test(model, test_loader, device)

    out_metrics = MetricRecord(
        {
            "loss": float(loss),
            "accuracy": float(accuracy),
            "num-examples": len(test_loader.dataset),
        }
    )

    print(f"[client {pid}] eval loss={loss:.4f}, acc={accuracy:.4f}")

    return Message(content=RecordDict({"metrics": out_metrics}), reply_to=msg)
