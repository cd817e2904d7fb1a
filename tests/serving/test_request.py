"""A request's mask identity and the prefix-cache salt made from it."""

from depn_serve.serving.request import MaskRequest, cache_salt, reserved_keys


def test_the_salt_follows_the_mask_content_not_the_process_version():
    a = MaskRequest("acme", 3, "f" * 32)
    assert cache_salt(a, None) == cache_salt(MaskRequest("acme", 7, "f" * 32), None)  # a restart, another replica
    assert cache_salt(a, None) != cache_salt(MaskRequest("acme", 3, "e" * 32), None)  # same version, other mask
    assert cache_salt(a, None) != cache_salt(MaskRequest("globex", 3, "f" * 32), None)
    assert cache_salt(MaskRequest("acme", 3), None) != cache_salt(MaskRequest("acme", 4), None)  # offline: version
    assert cache_salt(a, "depn:globex:" + "f" * 32).startswith(cache_salt(a, None) + "|")  # a client cannot forge


def test_extra_args_round_trip_and_reserved_keys():
    request = MaskRequest("acme", 3, "ab" * 16)
    assert MaskRequest.from_extra_args(request.to_extra_args()) == request
    assert MaskRequest.from_extra_args({"depn_tenant": 5}) is None
    assert reserved_keys({"depn_tenant": "x", "top_k": 1, "depn_mask_sha256": "y"}) == ["depn_mask_sha256",
                                                                                          "depn_tenant"]
