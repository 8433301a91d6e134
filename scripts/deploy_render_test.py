"""The wiring of a rendered 2-group LeaderWorkerSet deployment (two ranks per group, one GPU
each, as two nodes would hold them), checked on the pods LWS would make from it: group size =
world size, ranks and rank 0's address from what LWS injects, each group's NetworkPolicy
selecting exactly its own ranks, metrics scraped from leaders only, followers ready on the
group-formed file. Usage: deploy_render_test.py RENDERED.yaml (helm template output)."""
import sys

import yaml

LWS = "leaderworkerset.sigs.k8s.io/"
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by_kind = lambda k: [d for d in docs if d["kind"] == k]
failures = []


def check(ok, what):
    if not ok:
        failures.append(what)


def selects(sel, labels):
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions") or []:
        if e["operator"] == "NotIn" and labels.get(e["key"]) in e["values"]:
            return False
        if e["operator"] == "In" and labels.get(e["key"]) not in e["values"]:
            return False
    return True


(lws,) = by_kind("LeaderWorkerSet")
spec, t = lws["spec"], lws["spec"]["leaderWorkerTemplate"]
check(spec["replicas"] == 2, f"2 groups, got replicas {spec['replicas']}")
check(t["size"] == 2, f"size (world size) 2, got {t['size']}")
check(t["restartPolicy"] == "RecreateGroupOnPodRestart", "restartPolicy")
check(spec["rolloutStrategy"]["rollingUpdateConfiguration"] == {"maxUnavailable": 1, "maxSurge": 0}, "rollout")
check(lws["metadata"].get("annotations", {}).get(LWS + "exclusive-topology") == "topology.kubernetes.io/zone",
      "exclusive topology annotation")

# The pods LWS makes, with the labels and environment it adds.
pods = []
for g in range(spec["replicas"]):
    for idx in range(t["size"]):
        tmpl = t["leaderTemplate"] if idx == 0 else t["workerTemplate"]
        labels = {**tmpl["metadata"]["labels"], LWS + "name": lws["metadata"]["name"], LWS + "group-index": str(g),
                  LWS + "worker-index": str(idx)}
        env = {"LWS_LEADER_ADDRESS": f"{lws['metadata']['name']}-{g}.{lws['metadata']['name']}.qwen-serve",
               "LWS_GROUP_SIZE": str(t["size"]), "LWS_WORKER_INDEX": str(idx)}
        (c,) = [c for c in tmpl["spec"]["containers"] if c["name"] == "worker"]
        for e in c["env"]:
            if "valueFrom" in e:
                path = e["valueFrom"]["fieldRef"]["fieldPath"]
                key = path[len("metadata.labels['"):-2] if path.startswith("metadata.labels[") else None
                env[e["name"]] = labels.get(key, f"<{path}>")
            else:
                v = e["value"]
                for k, val in env.items():
                    v = v.replace(f"$({k})", val)
                env[e["name"]] = v
        pods.append({"group": g, "rank": idx, "labels": labels, "env": env, "container": c, "spec": tmpl["spec"]})

for p in pods:
    env, name = p["env"], f"group {p['group']} rank {p['rank']}"
    check(env["QWEN_RANK"] == str(p["rank"]), f"{name}: QWEN_RANK={env['QWEN_RANK']}")
    check(env["QWEN_WORLD_SIZE"] == "2", f"{name}: QWEN_WORLD_SIZE={env['QWEN_WORLD_SIZE']}")
    check(env["QWEN_GROUP"] == f"qwen-serve-worker-g{p['group']}", f"{name}: QWEN_GROUP={env['QWEN_GROUP']}")
    # Rank 0 advertises its stable name, the one every rank of its group is given.
    check(env["QWEN_COMM_ADVERTISE"] == f"qwen-serve-worker-{p['group']}.qwen-serve-worker.qwen-serve",
          f"{name}: QWEN_COMM_ADVERTISE={env['QWEN_COMM_ADVERTISE']}")
    limits = p["container"]["resources"]["limits"]
    check(limits.get("nvidia.com/gpu") == 1, f"{name}: one GPU, got {limits.get('nvidia.com/gpu')}")
    ready = p["container"]["readinessProbe"]
    if p["rank"] == 0:
        check(ready.get("grpc") == {"port": 50051, "service": "qwen.worker.v1.Worker"}, f"{name}: gRPC readiness")
    else:
        check(ready.get("exec", {}).get("command") == ["test", "-f", env["QWEN_READY_FILE"]],
              f"{name}: readiness on the group-formed file")
        check(not any(q["name"] in ("grpc", "metrics") for q in p["container"].get("ports", [])),
              f"{name}: a follower exposes no gRPC or metrics port")
check(len({p["env"]["QWEN_GROUP"] for p in pods}) == 2, "two distinct group names")

# Each group's rank policy guards exactly its ranks and admits exactly them.
for g in range(2):
    (np,) = [n for n in by_kind("NetworkPolicy") if n["metadata"]["name"] == f"qwen-serve-worker-g{g}-ranks"]
    guarded = {(p["group"], p["rank"]) for p in pods if selects(np["spec"]["podSelector"], p["labels"])}
    check(guarded == {(g, 0), (g, 1)}, f"group {g} rank policy guards {sorted(guarded)}")
    (rule,) = np["spec"]["ingress"]
    peers = {(p["group"], p["rank"]) for p in pods for f in rule["from"] if selects(f["podSelector"], p["labels"])}
    check(peers == {(g, 0), (g, 1)}, f"group {g} rank policy admits {sorted(peers)}")
(worker_np,) = [n for n in by_kind("NetworkPolicy") if n["metadata"]["name"] == "qwen-serve-worker"]
check(all(selects(worker_np["spec"]["podSelector"], p["labels"]) for p in pods), "worker policy guards every rank")

(pm,) = [m for m in by_kind("PodMonitor") if m["metadata"]["name"] == "qwen-serve-worker"]
scraped = {(p["group"], p["rank"]) for p in pods if selects(pm["spec"]["selector"], p["labels"])}
check(scraped == {(0, 0), (1, 0)}, f"metrics scraped from leaders only, got {sorted(scraped)}")

if failures:
    print("FAIL: 2-group LeaderWorkerSet render:\n  " + "\n  ".join(failures), file=sys.stderr)
    sys.exit(1)
print(f"  ok: 2-group LeaderWorkerSet render: {len(pods)} pods wired as expected")
