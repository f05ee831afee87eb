"""The contract fuzz suite's request strategies on message shapes Tessera's requests do not all have yet (oneofs, maps,
wrappers, recursion), and its check of the field paths violations name."""

from __future__ import annotations

from google.protobuf import field_mask_pb2, wrappers_pb2
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.common.v1 import common_pb2
from tessera.inventory.v1 import inventory_service_pb2, product_pb2
from tessera.user.v1 import user_service_pb2

from tests.support.proto_strategies import corruptions, messages, mutations, names_request_field

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(messages(common_pb2.AnyValue.DESCRIPTOR))
def test_a_oneof_has_at_most_one_member_set_at_every_depth(value):
    def check(v: common_pb2.AnyValue) -> None:
        assert sum(v.HasField(f.name) for f in v.DESCRIPTOR.oneofs_by_name["value"].fields) <= 1
        for item in v.array_value.values:
            check(item)
        for kv in v.kvlist_value.values:
            check(kv.value)

    check(value)
    assert common_pb2.AnyValue.FromString(value.SerializeToString()) == value


@FUZZ
@given(messages(error_details_pb2.ErrorInfo.DESCRIPTOR), messages(wrappers_pb2.Int64Value.DESCRIPTOR))
def test_maps_and_wrappers_are_filled_and_serialize(info, wrapped):
    assert error_details_pb2.ErrorInfo.FromString(info.SerializeToString()) == info
    assert -(2**63) <= wrapped.value < 2**63


@FUZZ
@given(messages(user_service_pb2.UpdateUserRequest.DESCRIPTOR))
def test_an_update_mask_names_mostly_paths_of_the_resource(request):
    assert isinstance(request.update_mask, field_mask_pb2.FieldMask)
    request.SerializeToString()


@FUZZ
@given(mutations(inventory_service_pb2.ReserveStockRequest.DESCRIPTOR), st.data())
def test_a_mutation_changes_at_most_the_field_it_names(mutation, data):
    valid = inventory_service_pb2.ReserveStockRequest(
        order_id="0b6f7d2c-3c1e-4d1a-9a59-6f1d1b9f1e2a",
        items=[product_pb2.ReservationItem(product_id="0b6f7d2c-3c1e-4d1a-9a59-6f1d1b9f1e2b", quantity=1)])
    changed = mutation.apply(valid)
    top = mutation.path[0][0].name
    for field in valid.DESCRIPTOR.fields:
        if field.name != top:
            assert getattr(changed, field.name) == getattr(valid, field.name)
    assert valid.items[0].quantity == 1  # the valid request itself is left as it was
    corrupt = data.draw(corruptions())
    assert isinstance(corrupt(valid.SerializeToString()), bytes)


def test_violation_paths_are_checked_against_the_descriptor_and_the_request():
    request = inventory_service_pb2.ReserveStockRequest(items=[product_pb2.ReservationItem()] * 2)
    desc = request.DESCRIPTOR
    for path in ("order_id", "items", "items[1].quantity", "items.product_id", "ttl.seconds"):
        assert names_request_field(desc, request, path), path
    for path in ("items[2].quantity", "order_id[0]", "itemz", "items[0].price", "ttl.nanos.x", "orderId", "", "a..b"):
        assert not names_request_field(desc, request, path), path
