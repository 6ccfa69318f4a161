import json, time
from torch.utils.data import TensorDataset
from nft_fast.harness.runs import BackdoorSpec, cached_run, poison_loader
from nft_fast.evaluation import evaluate
from nft_fast.trigger import scan, backdoor_likely
from nft_fast import NFTConfig, purify
spec = BackdoorSpec(attack="badnets", attack_params={"target": 0}, arch="r3d18", width=8, dataset="moving-shapes", epochs=6, seed=0)
run = cached_run(spec, progress=False)
test, pois = run.data.test_loader(), poison_loader(run.attack, run.data)
x, y = run.data.clean_set()
t0 = time.time()
res = purify(run.model, TensorDataset(x, y), NFTConfig.preset("strong"), progress=False)
f = res.folded(); m = evaluate(f, test, pois)
after = scan(f, x, y, steps=60).summary()
out = {"acc": m["acc"], "asr": m["asr"], "ra": m["ra"], "seconds": time.time() - t0, "scan_before": res.history[0]["scan"], "scan_after": after,
       "backdoor_likely": backdoor_likely(res.history[0]["scan"], after)}
print(json.dumps(out))
