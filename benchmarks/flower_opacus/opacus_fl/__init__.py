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
# Copied unchanged from Flower's examples/opacus/opacus_fl/__init__.py at adap/flower
# fdef7afb1dca3030553be302366cfd285ed6632c, for fedvault's benchmark
# (benchmarks/vs_flower_opacus.py).
"""opacus: Training with Sample-Level Differential Privacy using Opacus Privacy Engine."""
