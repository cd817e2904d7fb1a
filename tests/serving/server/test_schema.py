"""The admin API against its own OpenAPI schema (schemathesis, in process: the admin router behind the auth layer,
the state's engine calls answered by `Workers`): for generated paths, ids and mask bodies, every answer is one the
schema documents, in the documented shape, and never a server error."""

import asyncio

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from depn_serve.serving.server.http import AuthMiddleware, admin_router
from tests.serving.server.conftest import ADMIN_TOKEN, Workers

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
def admin_api(world):
    make_state, mask, _ = world
    state = make_state()
    asyncio.run(state.start(Workers()))
    asyncio.run(state.push("acme", "acme-main", mask(1)))
    app = FastAPI()
    app.include_router(admin_router(state))
    app.add_middleware(AuthMiddleware, state=state)
    return schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


def test_admin_answers_stay_within_the_schema(admin_api):
    operations = [result.ok() for result in admin_api.get_all_operations()]
    assert {op.label for op in operations} == {"GET /depn/v1/masks", "GET /depn/v1/health",
                                               "PUT /depn/v1/tenants/{tenant}/masks/{mask_id}",
                                               "DELETE /depn/v1/tenants/{tenant}/masks/{mask_id}"}
    statuses = set()
    for operation in operations:
        @given(case=operation.as_strategy(), real_tenant=st.booleans())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case, real_tenant):
            if real_tenant and case.path_parameters:  # half the cases name a configured tenant: past the 404
                case.path_parameters["tenant"] = "acme"
            for authorization in (f"Bearer {ADMIN_TOKEN}", "Bearer not-the-token", None):
                response = case.call(headers={"Authorization": authorization} if authorization else {})
                case.validate_response(response, checks=CHECKS)
                statuses.add(response.status_code)
                if authorization != f"Bearer {ADMIN_TOKEN}":
                    assert response.status_code in (401, 403)

        check()
    assert {200, 400, 401, 403, 404} <= statuses  # the cases reached past the auth layer and the validation
