"""The configuration schema: every invalid input is refused with field, value and reason."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from vram_scheduler.core.config import GIB, ConfigError, ModelSpec, PlacementSettings, load_config, parse_config
from vram_scheduler.core.inventory import parse_inventory
from vram_scheduler.core.planner import plan


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "values.yaml")
    assert caught.value.source == "values.yaml"
    return caught.value.problems


def model(**fields: object) -> dict[str, object]:
    return {"model_id": "m", "model": "org/m", "vram_gb": 4} | fields


def test_minimal_model_gets_documented_defaults() -> None:
    config = parse_config({"models": [model()]})
    (spec,) = config.models
    # max_model_len None: 8192 or the model's own maximum, resolved where the model's files are (model_limits)
    assert (spec.replicas, spec.max_replicas, spec.max_model_len, spec.max_tokens) == (1, False, None, 256)
    assert spec.vram_bytes == 4 * GIB
    assert config.placement.replica_overhead_gb is None  # each model's own, else derived (capacity)
    assert config.models[0].overhead_gb is None


def test_unknown_key_in_model_is_named_with_its_value() -> None:
    assert problems_of({"models": [model(vram_gib=3)]}) == [
        "models[0].vram_gib = 3: unknown key (allowed keys are listed by `ray-vram schema`)"
    ]


def test_unknown_top_level_and_placement_keys() -> None:
    problems = problems_of({"modles": [], "placement": {"overhead_gb": 1}})
    assert "modles = []" not in problems[0]
    assert any(p.startswith("modles: unknown key") for p in problems)
    assert "placement.overhead_gb = 1: unknown key (allowed keys are listed by `ray-vram schema`)" in problems


@pytest.mark.parametrize("value", [0, -3, -0.5])
def test_zero_or_negative_vram_is_refused(value: float) -> None:
    assert problems_of({"models": [model(vram_gb=value)]}) == [
        f"models[0].vram_gb = {value!r}: Input should be greater than 0"
    ]


def test_replicas_and_max_replicas_together_are_refused() -> None:
    (problem,) = problems_of({"models": [model(replicas=3, max_replicas=True)]})
    assert problem.startswith("models[0]: set either replicas (3) or max_replicas: true, not both")


def test_max_replicas_alone_is_fine() -> None:
    (spec,) = parse_config({"models": [model(max_replicas=True)]}).models
    assert spec.max_replicas


def test_duplicate_model_id_names_both_places() -> None:
    (problem,) = problems_of({"models": [model(), model(model="other")]})
    assert "models[1].model_id = 'm' is already used by models[0].model_id" in problem
    assert "must be unique" in problem


def test_router_name_clashing_with_a_model_id() -> None:
    (problem,) = problems_of({"models": [model(router_name="chat"), model(model_id="chat")]})
    assert "models[1].model_id = 'chat' is already used by models[0].router_name" in problem


def test_duplicate_router_name() -> None:
    (problem,) = problems_of({"models": [model(router_name="chat"), model(model_id="n", router_name="chat")]})
    assert "models[1].router_name = 'chat' is already used by models[0].router_name" in problem


def test_engine_kwargs_cannot_override_the_budget() -> None:
    (problem,) = problems_of({"models": [model(engine_kwargs={"gpu_memory_utilization": 0.9})]})
    assert problem.startswith("models[0].engine_kwargs: gpu_memory_utilization: ray-vram sets it from vram_gb")


def test_bad_model_id_and_settings() -> None:
    problems = problems_of({"models": [model(model_id="Bad Name")], "placement": {"stale_after_s": 0}})
    assert any(p.startswith("models[0].model_id = 'Bad Name': String should match pattern") for p in problems)
    assert "placement.stale_after_s = 0: Input should be greater than 0" in problems


def test_top_level_must_be_a_mapping() -> None:
    assert problems_of(["models"]) == ["expected a mapping at the top level, got list"]


def test_vram_larger_than_any_gpu_names_model_need_and_largest() -> None:
    inventory = parse_inventory(
        {
            "nodes": [
                {
                    "node": "a",
                    "gpus": [{"index": 0, "uuid": "G0", "total_gb": 24}, {"index": 1, "uuid": "G1", "total_gb": 16}],
                }
            ]
        }
    )
    models = [model(vram_gb=2), model(model_id="big", vram_gb=24), model(model_id="brim", vram_gb=22)]
    config = parse_config({"models": models})  # brim: 22 + 2 fills the 24 GiB GPU exactly, so it fits
    result = plan(inventory, config.models, settings=PlacementSettings(replica_overhead_gb=2))
    assert [(u.model_id, u.too_big) for u in result.unplaced] == [("big", True)]
    assert result.unplaced[0].largest_gpu == "GPU, 24.00 GiB on node a, GPU 0"
    assert result.unplaced[0].reason == (
        "1 replica of model big needs 26.00 GiB per replica (24 GiB budget + 2.00 GiB overhead), more than any "
        "GPU holds: the largest is 24.00 GiB (GPU) on node a, GPU 0; it needs a bigger GPU, not a free one"
    )


def test_oversized_respects_gpu_type() -> None:
    inventory = parse_inventory(
        {
            "nodes": [
                {
                    "node": "a",
                    "gpus": [
                        {"index": 0, "uuid": "G0", "name": "NVIDIA H100", "total_gb": 80},
                        {"index": 1, "uuid": "G1", "name": "RTX 4090", "total_gb": 24},
                    ],
                }
            ]
        }
    )
    config = parse_config({"models": [model(vram_gb=30, gpu_type="4090")]})
    (unplaced,) = plan(inventory, config.models, settings=PlacementSettings(replica_overhead_gb=2)).unplaced
    assert unplaced.too_big and unplaced.largest_gpu == "RTX 4090, 24.00 GiB on node a, GPU 1"
    assert "needs 32.00 GiB per replica (30 GiB budget + 2.00 GiB overhead), more than any GPU holds" in unplaced.reason


def test_load_config_takes_model_section_of_chart_values(tmp_path: Path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text("image: {tag: x}\nmonitor: {enabled: true}\nmodels:\n  - {model_id: m, model: x, vram_gb: 2}\n")
    assert [m.model_id for m in load_config(path).models] == ["m"]


def test_load_config_reports_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_error_survives_pickling() -> None:
    error = ConfigError("values.yaml", ["models[0].vram_gb = 0: Input should be greater than 0"])
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.source, copy.problems, str(copy)) == (error.source, error.problems, str(error))


def test_max_replicas_spec_round_trips_through_its_dump() -> None:
    spec = ModelSpec(model_id="fill", model="x", vram_gb=1, max_replicas=True)
    dumped = spec.model_dump(mode="json")
    assert "replicas" not in dumped
    assert ModelSpec.model_validate(dumped) == spec


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gpu-box.example"])
@pytest.mark.parametrize("key", [None, "", "  "])
def test_an_endpoint_beyond_loopback_requires_api_key_env(host: str, key: str | None) -> None:
    (problem,) = problems_of({"serving": {"host": host, "api_key_env": key}})
    assert problem.startswith(f"serving.api_key_env = {key!r}: required when serving.host = {host!r}")
    assert "RAY_VRAM_API_KEY" in problem and "127.0.0.1" in problem


def test_api_key_env_null_alone_is_refused_for_the_default_host() -> None:
    (problem,) = problems_of({"serving": {"api_key_env": None}})
    assert "serving.host = '0.0.0.0'" in problem


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "localhost"])
def test_a_loopback_endpoint_may_go_without_an_api_key(host: str) -> None:
    assert parse_config({"serving": {"host": host, "api_key_env": None}}).serving.api_key_env is None


def test_an_exposed_endpoint_with_api_key_env_is_accepted() -> None:
    serving = parse_config({"serving": {"host": "0.0.0.0", "api_key_env": "MY_KEY"}}).serving
    assert (serving.host, serving.api_key_env) == ("0.0.0.0", "MY_KEY")


def test_a_model_source_serves_its_name_from_its_directory() -> None:
    """`serving.model_sources`: a name that stands for a local directory, with the engine arguments it
    needs under the model's own; any other model is left as it is."""
    from vram_scheduler.core.config import ModelSpec, ServingSettings, with_source

    serving = ServingSettings.model_validate(
        {
            "model_sources": {
                "demo": {"path": "/cache/models/demo", "engine_kwargs": {"dtype": "float32", "max-num-seqs": 4}}
            }
        }
    )
    spec = ModelSpec(model_id="a", model="demo", vram_gb=1, engine_kwargs={"max_num_seqs": 2})
    served = with_source(spec, serving)
    assert served.model == "/cache/models/demo" and served.model_id == "a"
    assert served.engine_kwargs == {"dtype": "float32", "max_num_seqs": 2}  # the model's own wins
    other = ModelSpec(model_id="b", model="Qwen/Qwen2-0.5B-Instruct", vram_gb=1)
    assert with_source(other, serving) is other


def test_a_model_source_that_sets_an_owned_engine_argument_is_refused_naming_it() -> None:
    from vram_scheduler.core.config import ConfigError, ModelSpec, ServingSettings, with_source

    serving = ServingSettings.model_validate(
        {"model_sources": {"demo": {"path": "/m", "engine_kwargs": {"gpu_memory_utilization": 0.9}}}}
    )
    with pytest.raises(ConfigError) as refused:
        with_source(ModelSpec(model_id="a", model="demo", vram_gb=1), serving)
    assert str(refused.value).startswith("serving.model_sources['demo']: invalid configuration")
    assert "gpu_memory_utilization" in str(refused.value)
