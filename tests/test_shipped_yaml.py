"""Every YAML the project ships in jobs/, serve/ and cluster/ is parsed and validated here."""

from pathlib import Path

import pytest
import yaml

from ms_ray.config import DemoConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
# shipped file -> the typed config that validates it; a new YAML must be added here
TYPED = {"jobs/demo.yaml": DemoConfig}
SHIPPED = sorted(str(p.relative_to(ROOT)) for d in ("jobs", "serve", "cluster") for p in (ROOT / d).rglob("*.y*ml"))


def test_something_is_shipped():
    assert "jobs/demo.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_yaml_is_valid(path):
    assert path in TYPED, f"{path} has no typed config check: add it to TYPED"
    load_config(TYPED[path], ROOT / path)
    for doc in yaml.safe_load_all((ROOT / path).read_text()):
        assert isinstance(doc, dict)
