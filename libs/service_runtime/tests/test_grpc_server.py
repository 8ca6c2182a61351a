import asyncio, grpc
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
