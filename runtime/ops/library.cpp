// libmesa_ops.so's entry point: ONNX Runtime calls RegisterCustomOps when a session registers the
// library (runtime/custom_ops.py, the C++ runner). The ops live in one domain for the whole process.
#define ORT_API_MANUAL_INIT  // not linked to onnxruntime: the API comes from the session that loads us
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <mutex>

#include "ops.h"

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api) {
  Ort::InitApi(api->GetApi(ORT_API_VERSION));
  static std::once_flag once;
  static Ort::CustomOpDomain* domain = nullptr;
  try {
    std::call_once(once, [] {
      domain = new Ort::CustomOpDomain("ai.mesa.cpu");  // lives as long as the process: sessions keep using it
      domain->Add(decode_attention_op());
      domain->Add(prefill_attention_op());
    });
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
