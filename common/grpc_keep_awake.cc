#include "common/grpc_keep_awake.h"

#include <grpcpp/generic/generic_stub.h>

namespace joule {

// The method does not exist: the server answers UNIMPLEMENTED at once, and
// that answer is the completion the nexting threads need.
constexpr char kTickMethod[] = "/joule.v1.KeepAwake/Tick";

GrpcKeepAwake::GrpcKeepAwake(std::shared_ptr<grpc::Channel> channel, absl::Duration period)
    : channel_(std::move(channel)), period_(period) {
  thread_ = std::thread([this] {
    while (!stop_.WaitForNotificationWithTimeout(period_)) Tick();
  });
}

GrpcKeepAwake::~GrpcKeepAwake() {
  stop_.Notify();
  thread_.join();
}

void GrpcKeepAwake::Tick() {
  struct Call {
    grpc::ClientContext context;
    grpc::ByteBuffer request;
    grpc::ByteBuffer reply;
    absl::Notification done;
  };
  Call call;
  grpc::Slice empty("");  // an empty message (a default ByteBuffer is no message at all)
  call.request = grpc::ByteBuffer(&empty, 1);
  call.context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
  grpc::GenericStub stub(channel_);
  stub.UnaryCall(&call.context, kTickMethod, grpc::StubOptions(), &call.request, &call.reply,
                 [&call](grpc::Status) { call.done.Notify(); });
  // Waiting keeps at most one tick in flight and `call` alive until it ends.
  call.done.WaitForNotification();
}

}  // namespace joule
