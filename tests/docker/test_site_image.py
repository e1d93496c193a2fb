"""The site image (docker/): it runs as a non-root user that cannot write to its data mount.

Needs Podman and the image docker/test.sh builds (`.ci/run` runs docker/test.sh before
pytest). Without them the test fails and says what to run: it never skips.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SITE_IMAGE = "localhost/fedvault-site:cpu"
UID_IN_IMAGE = "10001"
# In the container: its user id, then whether appending to the data file worked.
PROBE = "id -u; if printf x >> /data/patients.csv; then echo wrote; else echo refused; fi"


def require_site_image() -> None:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run docker/test.sh (it sets up Podman and builds)")
    exists = subprocess.run(["podman", "image", "exists", SITE_IMAGE], check=False)
    if exists.returncode != 0:
        pytest.fail(f"no image {SITE_IMAGE}: run docker/test.sh (or docker/build.sh) first")


def probe_site(data: Path, mode: str) -> list[str]:
    """The site image's user id and the write attempt, with ``data`` mounted ``mode``."""
    result = subprocess.run(
        ["podman", "run", "--rm", "--network", "none", "--no-healthcheck",
         "-v", f"{data}:/data/patients.csv:{mode}", "--entrypoint", "sh", SITE_IMAGE, "-c", PROBE],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split()


def test_the_site_container_runs_as_non_root_and_cannot_write_its_data_mount(
    tmp_path: Path,
) -> None:
    # Prepare: a data file anyone may write on the host, so only the mount can stop a write.
    require_site_image()
    data = tmp_path / "patients.csv"
    data.write_text("f0,diagnosis\n1.0,benign\n", encoding="utf-8")
    data.chmod(0o666)
    tmp_path.chmod(0o755)

    # Execute: the site image as deployed (read-only data mount), and with a writable one.
    read_only = probe_site(data, "ro")
    untouched = data.read_text(encoding="utf-8")
    writable = probe_site(data, "rw")

    # Assert: a non-root user; the read-only mount refused the write that a writable one takes.
    assert read_only == [UID_IN_IMAGE, "refused"]
    assert untouched == "f0,diagnosis\n1.0,benign\n"
    assert writable == [UID_IN_IMAGE, "wrote"]
    assert data.read_text(encoding="utf-8").endswith("x")
