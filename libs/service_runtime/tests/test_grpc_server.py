import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service_runtime.grpc_server import create_grpc_server


async def test_health_watch_streams_through_metrics_interceptor():
    svc = create_grpc_server("127.0.0.1:0", lambda server: ["x.Y"], "test")
    await svc.server.start()
    await svc.set_ready(False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        call = stub.Watch(health_pb2.HealthCheckRequest(service="x.Y"))
        first = await call.read()
        assert first.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await svc.set_ready(True)
        second = await call.read()
        assert second.status == health_pb2.HealthCheckResponse.SERVING
        call.cancel()
    await svc.stop(0)


async def test_a_second_server_on_a_port_in_use_fails_rather_than_sharing_it():
    """gRPC's default SO_REUSEPORT would let it bind and take half the first one's calls."""
    first = create_grpc_server("127.0.0.1:0", lambda server: ["x.Y"], "test")
    await first.server.start()
    try:
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{first.port}"):
            create_grpc_server(f"127.0.0.1:{first.port}", lambda server: ["x.Y"], "test")
    finally:
        await first.stop(0)


async def test_reflection_lists_the_business_and_health_services():
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    svc = create_grpc_server("127.0.0.1:0", lambda server: ["x.Y"], "test")
    await svc.server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        names = {s.name for s in reply.list_services_response.service}
    await svc.stop(0)
    assert {"x.Y", "grpc.health.v1.Health"} <= names


async def test_graceful_stop_reports_not_serving_before_stopping():
    svc = create_grpc_server("127.0.0.1:0", lambda server: ["x.Y"], "test")
    await svc.server.start()
    await svc.set_ready(True)
    await svc.health.enter_graceful_shutdown()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="x.Y"))
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await svc.server.stop(0)


async def test_trace_context_flows_from_caller_through_a_server_to_the_next_hop():
    """A server forwards the traceparent it received to the service it calls next."""
    from grpc_health.v1 import health

    from service_runtime.grpc_server import insecure_channel

    seen: list[str] = []

    class Recorder(health.aio.HealthServicer):
        async def Check(self, request, ctx):
            seen.append(dict(ctx.invocation_metadata()).get("traceparent", ""))
            return await super().Check(request, ctx)

    downstream = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(Recorder(), downstream)
    down_port = downstream.add_insecure_port("127.0.0.1:0")
    await downstream.start()

    class Relay(health.aio.HealthServicer):
        async def Check(self, request, ctx):
            async with insecure_channel(f"127.0.0.1:{down_port}") as ch:
                return await health_pb2_grpc.HealthStub(ch).Check(request)

    def register(server):
        health_pb2_grpc.add_HealthServicer_to_server(Relay(), server)
        return []

    relay = create_grpc_server("127.0.0.1:0", register, "relay")
    await relay.server.start()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    incoming = f"00-{trace_id}-00f067aa0ba902b7-01"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as ch:
        await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), metadata=(("traceparent", incoming),)
        )
    await relay.server.stop(0)
    await downstream.stop(0)
    assert len(seen) == 1 and seen[0].split("-")[1] == trace_id
