// Proves the Protobuf/gRPC toolchain end to end: generated messages, a real
// in-process server on an ephemeral port, and a client call with a deadline.
#include <chrono>
#include <iostream>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "gtest/gtest.h"
#include "proto/joule/v1/model.grpc.pb.h"
#include "proto/joule/v1/model.pb.h"

namespace joule {
namespace {

class FakeModelService final : public v1::ModelService::Service {
 public:
  grpc::Status GetModelInfo(grpc::ServerContext* context, const v1::GetModelInfoRequest* request,
                            v1::ModelInfo* reply) override {
    reply->set_name("joule-tiny-moe");
    reply->set_architecture("Qwen3MoeForCausalLM");
    reply->set_vocab_size(259);
    reply->set_hidden_size(64);
    reply->set_num_layers(2);
    reply->set_num_experts(8);
    reply->set_top_k(2);
    reply->set_max_context(int64_t{1} << 33);  // needs the int64 field
    return grpc::Status::OK;
  }
};

TEST(Proto, GetModelInfoOverGrpc) {
  FakeModelService service;
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  ASSERT_GT(port, 0) << "server did not bind an ephemeral port";
  std::cout << "ModelService listening on 127.0.0.1:" << port << std::endl;
  RecordProperty("port", port);

  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::ModelService::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::ModelInfo info;
  grpc::Status status = stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
  ASSERT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message();
  EXPECT_EQ(info.name(), "joule-tiny-moe");
  EXPECT_EQ(info.architecture(), "Qwen3MoeForCausalLM");
  EXPECT_EQ(info.vocab_size(), 259);
  EXPECT_EQ(info.hidden_size(), 64);
  EXPECT_EQ(info.num_layers(), 2);
  EXPECT_EQ(info.num_experts(), 8);
  EXPECT_EQ(info.top_k(), 2);
  EXPECT_EQ(info.max_context(), int64_t{1} << 33);

  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
}

TEST(Proto, UnimplementedMethodIsAnErrorNotAHang) {
  v1::ModelService::Service unimplemented;  // the generated base answers UNIMPLEMENTED
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&unimplemented);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  ASSERT_GT(port, 0);

  auto stub = v1::ModelService::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::ModelInfo info;
  grpc::Status status = stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
}

TEST(Proto, SamplingParamsRoundTripThroughTheWireFormat) {
  v1::SamplingParams params;
  params.set_temperature(0.7f);
  params.set_top_p(0.9f);
  params.set_top_k(40);
  params.set_max_tokens(128);
  params.add_stop_token_ids(258);
  params.add_stop_token_ids(256);
  params.set_ignore_eos(true);
  EXPECT_FALSE(params.has_seed());  // proto3 optional: absence is visible
  params.set_seed(0);
  EXPECT_TRUE(params.has_seed());

  v1::SamplingParams back;
  ASSERT_TRUE(back.ParseFromString(params.SerializeAsString()));
  EXPECT_FLOAT_EQ(back.temperature(), 0.7f);
  EXPECT_FLOAT_EQ(back.top_p(), 0.9f);
  EXPECT_EQ(back.top_k(), 40);
  EXPECT_EQ(back.max_tokens(), 128);
  ASSERT_EQ(back.stop_token_ids_size(), 2);
  EXPECT_EQ(back.stop_token_ids(0), 258);
  EXPECT_EQ(back.stop_token_ids(1), 256);
  EXPECT_TRUE(back.ignore_eos());
  EXPECT_TRUE(back.has_seed());
  EXPECT_EQ(back.seed(), 0u);
}

}  // namespace
}  // namespace joule
