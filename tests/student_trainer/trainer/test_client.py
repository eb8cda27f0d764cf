"""How the client addresses replicas: one name as is (DNS finds every replica), several endpoints as an
IPv4 list for round-robin, names resolved, unresolvable names refused with the endpoint named."""

from __future__ import annotations

import pytest

from student_trainer.trainer.client import channel_target, service_config


def test_one_endpoint_is_passed_as_is():
    assert channel_target(["teacher-llama2:50051"]) == "teacher-llama2:50051"
    assert channel_target("dns:///teacher-llama2:50051") == "dns:///teacher-llama2:50051"


def test_several_endpoints_become_an_ipv4_list_with_names_resolved():
    assert channel_target(["127.0.0.1:5001", "127.0.0.2:5002"]) == "ipv4:127.0.0.1:5001,127.0.0.2:5002"
    assert channel_target(["localhost:5001", "127.0.0.1:5002"]) == "ipv4:127.0.0.1:5001,127.0.0.1:5002"


def test_unresolvable_name_is_refused_naming_the_endpoint():
    with pytest.raises(ValueError, match="'no-such-teacher.invalid:1'"):
        channel_target(["no-such-teacher.invalid:1", "127.0.0.1:2"])


def test_retry_policy_only_for_two_or_more_attempts():
    assert "methodConfig" not in service_config(1)
    policy = service_config(5)["methodConfig"][0]["retryPolicy"]
    assert policy["maxAttempts"] == 5 and policy["retryableStatusCodes"] == ["UNAVAILABLE"]
