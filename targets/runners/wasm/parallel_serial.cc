// Serial TVMBackendParallelLaunch for the single-threaded wasm runtime: a parallel loop runs as one task.
#include <tvm/runtime/c_backend_api.h>

extern "C" {
int TVMBackendParallelLaunch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  TVMParallelGroupEnv env;
  env.sync_handle = nullptr;
  env.num_task = 1;
  return flambda(0, &env, cdata);
}
int TVMBackendParallelBarrier(int task_id, TVMParallelGroupEnv* penv) { return 0; }
}
