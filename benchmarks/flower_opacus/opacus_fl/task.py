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
# examples/opacus/opacus_fl/task.py at adap/flower
# fdef7afb1dca3030553be302366cfd285ed6632c:
# - the dataset: CIFAR-10 through flwr_datasets (a download) is replaced by scikit-learn's
#   breast-cancer table, split IID into `num_partitions` sites, each site's rows split
#   80/20 into train/test (seed 42, as before) and standardized with its train rows'
#   statistics (in place of the image Normalize transform);
# - the model: the CNN `Net` is replaced by the logistic model fedvault uses for this table
#   (one linear layer on the 30 features, 2 classes);
# - tqdm progress bars removed (tqdm is not installed here); the loops are unchanged.
"""opacus: Training with Sample-Level Differential Privacy using Opacus Privacy Engine."""

import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader

fds = None  # Cache the loaded table (was: FederatedDataset)


class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(30, 2)

    def forward(self, x):
        return self.fc(self.flatten(x))


class _Rows(torch.utils.data.Dataset):
    """A partition's rows as {"img": features, "label": label} items, as the loops read them."""

    def __init__(self, features, labels):
        self.features = torch.tensor(features, dtype=torch.float32)
        self.labels = torch.tensor(labels, dtype=torch.int64)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"img": self.features[index], "label": self.labels[index]}


def load_data(partition_id: int, num_partitions: int):
    global fds
    if fds is None:
        fds = load_breast_cancer()

    # IID partition (as IidPartitioner with shuffling): shuffle with seed 42, split evenly
    order = np.random.default_rng(42).permutation(len(fds.target))
    rows = np.array_split(order, num_partitions)[partition_id]
    features, labels = fds.data[rows], fds.target[rows]
    # Divide data on each node: 80% train, 20% test
    train_x, test_x, train_y, test_y = train_test_split(
        features, labels, test_size=0.2, random_state=42
    )
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-8
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std

    train_loader = DataLoader(_Rows(train_x, train_y), batch_size=32, shuffle=True)
    test_loader = DataLoader(_Rows(test_x, test_y), batch_size=32)
    return train_loader, test_loader


def train(net, train_loader, privacy_engine, optimizer, target_delta, device, epochs=1):
    criterion = torch.nn.CrossEntropyLoss()
    net.to(device)
    net.train()
    for _ in range(epochs):
        for batch in train_loader:
            images = batch["img"]
            labels = batch["label"]
            optimizer.zero_grad()
            criterion(net(images.to(device)), labels.to(device)).backward()
            optimizer.step()

    epsilon = privacy_engine.get_epsilon(delta=target_delta)
    return epsilon


def test(net, test_loader, device):
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for batch in test_loader:
            images = batch["img"].to(device)
            labels = batch["label"].to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (torch.max(outputs.data, 1)[1] == labels).sum().item()
    accuracy = correct / len(test_loader.dataset)
    return loss, accuracy
