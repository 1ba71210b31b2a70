"""KvRouterConfig, RouterConfig, RouterMode: Dynamo 1.6.1's defaults (spec §11), unknown and
unsupported fields refused by name, from_json / to_json / copy / with_overrides."""

import copy
import json
from typing import Any, Dict

import pytest

from kvrouter import KvRouterConfig, RouterConfig, RouterMode, UnsupportedOption

# §11, fields kvrouter implements, with Dynamo's defaults.
DYNAMO_DEFAULTS: Dict[str, Any] = {
    "overlap_score_weight": None,
    "host_cache_hit_weight": 0.75,
    "disk_cache_hit_weight": 0.25,
    "router_temperature": 0.0,
    "use_kv_events": True,
    "router_track_active_blocks": True,
    "router_assume_kv_reuse": True,
    "router_track_prefill_tokens": True,
    "router_prefill_load_model": "none",
    "router_ttl_secs": 120.0,
    "router_queue_threshold": None,
    "router_queue_policy": "fcfs",
    "router_predicted_ttl_secs": None,
    "overlap_score_credit": 1.0,
    "overlap_score_credit_decay": 0.0,
    "prefill_load_scale": 1.0,
    "decode_active_request_weight": 0.0,
}

# §11 fields kvrouter does not implement, with the default (= "off") value Dynamo gives them.
UNSUPPORTED: Dict[str, Any] = {
    "router_replica_sync": False,
    "router_track_output_blocks": False,
    "router_approximate_cache_policy": "ttl",
    "router_event_threads": 4,
    "use_remote_indexer": False,
    "serve_indexer": False,
    "enable_session_prefix_index": False,
    "shared_cache_multiplier": None,
    "shared_cache_type": "none",
    "conditional_disagg_enabled": False,
    "conditional_disagg_policy": "isl_bounding",
    "conditional_disagg_eff_isl_threshold": 2048,
    "conditional_disagg_eff_isl_ratio_threshold": 0.7,
    "conditional_disagg_prefill_busy_threshold": None,
    "conditional_disagg_decode_busy_threshold": None,
    "router_policy_config": None,
    "router_prefill_policy": None,
    "router_decode_policy": None,
    "router_tracking_hash": "public-xxh3-v1",
    "router_tracking_key_file": None,
    "router_tracking_key_id": None,
}

# A value other than "off" for each unsupported field.
ON: Dict[str, Any] = {
    "router_replica_sync": True,
    "router_track_output_blocks": True,
    "router_approximate_cache_policy": "lru",
    "router_event_threads": 1,
    "use_remote_indexer": True,
    "serve_indexer": True,
    "enable_session_prefix_index": True,
    "shared_cache_multiplier": 0.5,
    "shared_cache_type": "hicache",
    "conditional_disagg_enabled": True,
    "conditional_disagg_policy": "other",
    "conditional_disagg_eff_isl_threshold": 4096,
    "conditional_disagg_eff_isl_ratio_threshold": 0.5,
    "conditional_disagg_prefill_busy_threshold": 0.9,
    "conditional_disagg_decode_busy_threshold": 0.9,
    "router_policy_config": {"a": 1},
    "router_prefill_policy": "x",
    "router_decode_policy": "y",
    "router_tracking_hash": "keyed-xxh3-v1",
    "router_tracking_key_file": "/k",
    "router_tracking_key_id": "id",
}


def test_defaults_are_dynamos() -> None:
    c = KvRouterConfig()
    for name, want in {**DYNAMO_DEFAULTS, **UNSUPPORTED}.items():
        assert getattr(c, name) == want, name
    d = c.to_dict()
    for name, want in DYNAMO_DEFAULTS.items():
        assert d[name] == want, name
    # Every field the core has is readable as an attribute (a new core field needs a getter).
    for name, value in d.items():
        assert getattr(c, name) == value, name
    assert set(UNSUPPORTED).isdisjoint(d)


def test_kvrouter_fields() -> None:
    c = KvRouterConfig(
        router_selection_policy="affinity",
        router_affinity_load_factor=1.5,
        router_queue_threshold=2.0,
        router_queue_policy="wspt",
        router_prefill_load_model="ais",
        router_prefill_time_coefficients=(10.0, 0.01, 1e-7),
    )
    assert c.router_selection_policy == "affinity"
    assert c.router_queue_policy == "wspt"
    assert c.router_prefill_load_model == "aic"
    assert c.router_prefill_time_coefficients == {"base_ms": 10.0, "per_token_ms": 0.01, "per_token2_ms": 1e-7}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_fields_refused_unless_off(name: str) -> None:
    # The "off" value is what kvrouter does: accepted.
    assert KvRouterConfig(**{name: UNSUPPORTED[name]}) == KvRouterConfig()
    with pytest.raises(UnsupportedOption, match=rf"KvRouterConfig\.{name}=.* is not supported by kvrouter") as e:
        KvRouterConfig(**{name: ON[name]})
    assert isinstance(e.value, ValueError)
    with pytest.raises(UnsupportedOption, match=name):
        KvRouterConfig.from_json(json.dumps({name: ON[name]}))
    with pytest.raises(UnsupportedOption, match=name):
        KvRouterConfig().with_overrides(**{name: ON[name]})


def test_unknown_and_invalid_fields() -> None:
    with pytest.raises(TypeError, match="unknown KvRouterConfig field.*router_temprature"):
        KvRouterConfig(router_temprature=1.0)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="unknown KvRouterConfig field.*bogus"):
        KvRouterConfig.from_json('{"bogus": 1}')
    with pytest.raises(TypeError, match=r"KvRouterConfig\.router_temperature='hot'"):
        KvRouterConfig(router_temperature="hot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="router_temperature must be a finite number"):
        KvRouterConfig(router_temperature=-1.0)
    with pytest.raises(ValueError, match=r"router_queue_policy='lifo'.*unknown variant"):
        KvRouterConfig(router_queue_policy="lifo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="JSON"):
        KvRouterConfig.from_json("{")
    with pytest.raises(ValueError, match="object"):
        KvRouterConfig.from_json("[1]")
    with pytest.raises(AttributeError):
        KvRouterConfig().nope  # type: ignore[attr-defined]


def test_json_copy_overrides() -> None:
    c = KvRouterConfig(router_temperature=0.5, overlap_score_weight=2.0, use_kv_events=False)
    assert KvRouterConfig.from_json(c.to_json()) == c
    assert KvRouterConfig.from_json('{"router_temperature": 0.5, "overlap_score_weight": 2, "use_kv_events": false}') == c
    assert KvRouterConfig.from_json("{}") == KvRouterConfig()
    d = c.copy()
    assert d == c and d is not c
    assert copy.copy(c) == c and copy.deepcopy(c) == c
    e = c.with_overrides(router_temperature=0.0, router_ttl_secs=30)
    assert (e.router_temperature, e.router_ttl_secs, e.overlap_score_weight) == (0.0, 30.0, 2.0)
    assert c.router_temperature == 0.5  # unchanged
    assert c != e
    assert "router_temperature=0.5" in repr(c)
    assert repr(KvRouterConfig()) == "KvRouterConfig()"


def test_router_mode() -> None:
    modes = [
        RouterMode.RoundRobin,
        RouterMode.Random,
        RouterMode.PowerOfTwoChoices,
        RouterMode.KV,
        RouterMode.Direct,
        RouterMode.LeastLoaded,
        RouterMode.DeviceAwareWeighted,
    ]
    assert len(set(modes)) == 7
    assert RouterMode.from_str("kv") == RouterMode.KV
    assert RouterMode.from_str("power-of-two-choices") == RouterMode.PowerOfTwoChoices
    assert str(RouterMode.RoundRobin) == "round-robin"
    with pytest.raises(ValueError, match="unknown router mode"):
        RouterMode.from_str("fastest")


def test_router_config() -> None:
    kv = KvRouterConfig(router_temperature=0.25)
    rc = RouterConfig(RouterMode.KV, kv, active_decode_blocks_threshold=0.9, active_prefill_tokens_threshold=1000)
    assert rc.mode == RouterMode.KV
    assert rc.config == kv
    assert rc.active_decode_blocks_threshold == 0.9
    assert rc.active_prefill_tokens_threshold == 1000
    assert rc.active_prefill_tokens_threshold_frac is None
    assert (rc.enforce_disagg, rc.session_affinity_ttl_secs, rc.session_affinity_mode) == (False, None, "hard")
    assert rc.device_ratio == 8.0
    assert rc.copy() == rc
    assert "RouterMode.KV" in repr(rc)
    default = RouterConfig()
    assert default.mode == RouterMode.RoundRobin and default.config == KvRouterConfig()
    with pytest.raises(UnsupportedOption, match="enforce_disagg"):
        RouterConfig(RouterMode.KV, enforce_disagg=True)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedOption, match="session_affinity_ttl_secs"):
        RouterConfig(RouterMode.KV, session_affinity_ttl_secs=60.0)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedOption, match="session_affinity_mode"):
        RouterConfig(RouterMode.KV, session_affinity_mode="soft")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="active_decode_blocks_threshold"):
        RouterConfig(RouterMode.KV, active_decode_blocks_threshold=1.5)
    with pytest.raises(TypeError):
        RouterConfig("kv")  # type: ignore[arg-type]
