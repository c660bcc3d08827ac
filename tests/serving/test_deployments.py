"""The session-id format, and what the ingress replica loads (no Ray cluster needed)."""

import subprocess
import sys

import pytest
from ray import cloudpickle

import ms_ray.serving.app  # noqa: F401  (as where `build` runs: the whole app, torch included)
from ms_ray.serving.ingress import Ingress
from ms_ray.serving.session_ids import new_session_id, replica_of


def test_a_session_id_names_its_replica():
    ids = {new_session_id("k3x9q2ab") for _ in range(100)}
    assert len(ids) == 100 and {replica_of(i) for i in ids} == {"k3x9q2ab"}
    assert all(i.startswith("k3x9q2ab.") and len(i) == len("k3x9q2ab.") + 16 for i in ids)


@pytest.mark.parametrize("text", ["zzzzzzzz", "", "a.b", "k3x9q2ab.0123", "k3x9q2ab.0123456789abcdeF",
                                  "x.k3x9q2ab.0123456789abcdef", "k3x9q2ab.0123456789abcdef\n", None, 7])
def test_what_is_not_a_session_id_names_no_replica(text):
    assert replica_of(text) is None


@pytest.mark.parametrize("replica", ["", "a.b", "a/b", "x" * 65])
def test_a_replica_id_that_would_not_read_back_is_refused(replica):
    with pytest.raises(ValueError, match="replica id"):
        new_session_id(replica)


def test_the_ingress_replica_loads_without_torch(tmp_path):
    """Serve pickles the Ingress class where the app is built (a process that has imported app.py,
    torch and all) and the ingress replica unpickles it, importing what the class refers to. None
    of that, nor the session router the replica's handle loads, may import torch: a module-level
    helper taken from app.py (say the handle-call `awaited`) would."""
    blob = tmp_path / "ingress.pickle"
    blob.write_bytes(cloudpickle.dumps(Ingress.func_or_class))
    code = ("import sys; from ray import cloudpickle; import ms_ray.serving.routing; "
            "cloudpickle.loads(open(sys.argv[1], 'rb').read()); "
            "print(sorted(m for m in ('torch', 'transformers', 'ms_ray.serving.app') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(blob)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", "the ingress replica would import " + done.stdout
