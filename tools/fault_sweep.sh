#!/bin/bash
# Fault sweep: bad flags (every algorithm file), damaged data, run-directory faults; each case runs one command,
# and a traceback in its output or a hang is a failure. DATA=../shared/data tools/fault_sweep.sh (30 min on 2 cores).
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
S=$(mktemp -d); trap 'rm -rf "$S"' EXIT
D=${DATA:?set DATA to the folder holding omniglot-small/}
T="--dataset synthetic --synthetic-shape 1,16,16 --filters 8 --tasks 2 --ways 3 --queries 2 --inner-steps 2
   --epochs 2 --iters-per-epoch 2 --val-tasks 4 --test-tasks 4 --ensemble 2 --quiet"
O="--data-root $D --epochs 1 --iters-per-epoch 1 --val-tasks 2 --test-tasks 2 --quiet --cache-dir $S/cache"
n=0; bad=0; hung=0
case_() { # name, command...
  local name="$1"; shift
  n=$((n+1))
  out=$(timeout 300 "$@" 2>&1); rc=$?
  if [ $rc -eq 124 ]; then
    hung=$((hung+1)); echo "HANG [$name]: still running after 300 s"
  elif grep -q "Traceback" <<<"$out"; then
    bad=$((bad+1)); echo "TRACEBACK [$name] rc=$rc"; echo "$out" | tail -4 | sed 's/^/    /'
  else
    echo "ok [$name] rc=$rc: $(echo "$out" | grep -i -m1 'error\|warning\|interrupted\|diverged' | cut -c1-150)"
  fi
}
for f in maml_gs metasgd_gs mamlpp_gs cml lwdgh; do
  for a in "--ways 0" "--ways 1" "--shots -1" "--queries 0" "--tasks 0" "--epochs 0" "--outer-lr 0" \
           "--outer-lr nan" "--outer-lr inf" "--inner-lr -1" "--inner-lr nan" "--seed -1" "--seed 9223372036854775808" \
           "--eval-seed 99999999999999999999" "--filters 0" "--ensemble 0" "--eval-batch 0" "--max-bad-steps 0" \
           "--synthetic-shape 1,8,8" "--synthetic-shape x" "--dataset imagenet" "--device tpu" "--device cuda" \
           "--vmap maybe" "--tasks 1000000000" "--filters 100000000" \
           "--val-tasks 100000000000" "--inner-steps 0" "--test-queries -1" "--shots two" "--backbone resnet12" \
           "--resnet-width 0" "--backbone vgg"; do
    case_ "$f $a" $PY $f.py $T $a --out $S/r_${f}_$n
  done
done
case_ "cml gamma nan" $PY cml.py $T --gamma nan --out $S/g1
case_ "mamlpp min-outer-lr > outer" $PY mamlpp_gs.py $T --min-outer-lr 1 --out $S/g2
case_ "lwdgh clip -1" $PY lwdgh.py $T --clip-grad -1 --out $S/g3
case_ "lwdgh test-inner-steps 0" $PY lwdgh.py $T --test-inner-steps 0 --out $S/g4
# data faults
case_ "missing mini" $PY maml_gs.py --dataset miniimagenet $O --data-root $S/nodata --out $S/d1
case_ "missing cub" $PY maml_gs.py --dataset cub $O --data-root $S/nodata --out $S/d2
case_ "missing omniglot" $PY maml_gs.py --dataset omniglot $O --data-root $S/nodata --out $S/d3
case_ "bbox on omniglot" $PY maml_gs.py --dataset omniglot --bbox-crop $O --out $S/d4
mkdir -p $S/dz/omniglot-small
head -c 100000 $D/omniglot-small/images_background_small1.zip > $S/dz/omniglot-small/images_background_small1.zip
cp $D/omniglot-small/images_background_small2.zip $S/dz/omniglot-small/
case_ "truncated omniglot zip" $PY maml_gs.py $O --data-root $S/dz --cache-dir $S/c2 --out $S/d5
mkdir -p $S/dh/miniimagenet; echo "<html>quota</html>" > $S/dh/miniimagenet/mini-imagenet-cache-train.pkl
case_ "html mini pickle" $PY maml_gs.py --dataset miniimagenet $O --data-root $S/dh --out $S/d6
mkdir -p $S/dp/miniimagenet; head -c 5000 /dev/urandom > $S/dp/miniimagenet/mini-imagenet-cache-train.pkl
case_ "random bytes mini pickle" $PY maml_gs.py --dataset miniimagenet $O --data-root $S/dp --out $S/d7
mkdir -p $S/dc/miniimagenet/images; printf 'filename,label\n' > $S/dc/miniimagenet/train.csv
case_ "empty mini csv" $PY maml_gs.py --dataset miniimagenet $O --data-root $S/dc --out $S/d8
mkdir -p $S/dcub/cub; head -c 10000 /dev/urandom > $S/dcub/cub/CUB_200_2011.tgz
case_ "random cub tgz" $PY maml_gs.py --dataset cub $O --data-root $S/dcub --out $S/d9
mkdir -p $S/dcub2/cub/CUB_200_2011; : > $S/dcub2/cub/CUB_200_2011/images.txt
case_ "empty cub images.txt" $PY maml_gs.py --dataset cub $O --data-root $S/dcub2 --out $S/d10
# a good omniglot-small cache, then damage it
$PY maml_gs.py $O --out $S/ok >/dev/null 2>&1
for c in $S/cache/*/*.pt; do head -c 1000 $c > $c.x && mv $c.x $c; done
case_ "truncated cache" $PY maml_gs.py $O --out $S/d11
rm -rf $S/cache
case_ "ways 500 on omniglot-small" $PY maml_gs.py $O --ways 500 --out $S/d12
case_ "queries 30 on omniglot-small" $PY maml_gs.py $O --queries 30 --out $S/d13
# run directory faults
touch $S/afile
case_ "--out is a file" $PY maml_gs.py $T --out $S/afile
case_ "--out under a file" $PY maml_gs.py $T --out $S/afile/run
case_ "resume nonexistent" $PY maml_gs.py $T --resume $S/nothere
mkdir -p $S/notrun
case_ "resume not a run" $PY maml_gs.py $T --resume $S/notrun
$PY maml_gs.py $T --out $S/good >/dev/null 2>&1
case_ "new run into finished run" $PY maml_gs.py $T --out $S/good
case_ "resume finished run" $PY maml_gs.py --resume $S/good --quiet
case_ "resume with other program" $PY lwdgh.py --resume $S/good --quiet
case_ "resume with changed flag" $PY maml_gs.py --resume $S/good --ways 4 --quiet
cp -r $S/good $S/bad1; head -c 300 $S/bad1/last.pt > $S/bad1/l && mv $S/bad1/l $S/bad1/last.pt
case_ "truncated last.pt" $PY maml_gs.py --resume $S/bad1 --quiet
cp -r $S/good $S/bad2; echo '{half' > $S/bad2/config.json
case_ "damaged config.json" $PY maml_gs.py --resume $S/bad2 --quiet
cp -r $S/good $S/bad3; $PY lwdgh.py $T --out $S/lw >/dev/null 2>&1; cp $S/lw/last.pt $S/bad3/last.pt
case_ "foreign last.pt" $PY maml_gs.py --resume $S/bad3 --quiet
cp -r $S/good $S/bad4; for e in $S/bad4/epoch*.pt; do : > $e; done
sed -i 's/"finished"/"running"/' $S/bad4/config.json
case_ "empty epoch checkpoints at meta-test" $PY maml_gs.py --resume $S/bad4 --quiet
cp -r $S/good $S/bad5; rm -f $S/bad5/epoch*.pt
case_ "missing epoch checkpoints" $PY maml_gs.py --resume $S/bad5 --quiet
case_ "tensorboard w/o package" $PY maml_gs.py $T --tensorboard --out $S/tb
# issue 29: runs interrupted (SIGTERM after $1 s) and then damaged, resumed on other data, edited, absurd values
term_() { # seconds, run directory, command...: SIGTERM after the seconds; the run must save and exit within 60 s
  local secs="$1" dir="$2"; shift 2
  "$@" --out "$dir" >"$dir.log" 2>&1 & local pid=$!
  sleep "$secs"; kill -TERM $pid
  for _ in $(seq 60); do kill -0 $pid 2>/dev/null || break; sleep 1; done
  if kill -0 $pid 2>/dev/null; then kill -9 $pid; hung=$((hung+1)); echo "HANG [SIGTERM to $*]"; fi
  wait $pid 2>/dev/null
  grep -q Traceback "$dir.log" && { bad=$((bad+1)); echo "TRACEBACK [SIGTERM to $*]"; }
}
L="$T --epochs 60 --iters-per-epoch 5 --test-inner-steps 3"
term_ 15 $S/t1 $PY lwdgh.py $L
truncate -s 300 $S/t1/tasks.csv
case_ "tasks.csv cut mid-row, resume" $PY lwdgh.py --resume $S/t1 --quiet
[ "$(tr -cd '\000' < $S/t1/tasks.csv | wc -c)" -eq 0 ] || { bad=$((bad+1)); echo "NUL bytes in tasks.csv"; }
term_ 15 $S/t2 $PY lwdgh.py $L
rm $S/t2/tasks.csv
case_ "tasks.csv deleted, resume" $PY lwdgh.py --resume $S/t2 --quiet
case_ "resume on other data (full Omniglot)" $PY maml_gs.py --resume $S/ok --quiet --data-root $D/omniglot-full
mkdir -p $S/mine; echo notes > $S/mine/notes.txt; echo '{"a": 1}' > $S/mine/config.json
case_ "--out into a folder of the user's files" $PY maml_gs.py $T --out $S/mine
[ "$(cat $S/mine/notes.txt)" = notes ] || { bad=$((bad+1)); echo "the user's file was changed"; }
for edit in '"ways": "5"' '"epochs": null' '"synthetic_shape": 16' '"device": "tpu"' '"gs": 1'; do
  cp -r $S/good $S/cfg$n; $PY -c "import json,sys; p=sys.argv[1]; c=json.load(open(p)); c.update(json.loads('{'+sys.argv[2]+'}'))
json.dump(c, open(p, 'w'))" $S/cfg$n/config.json "$edit"
  case_ "config.json $edit" $PY maml_gs.py --resume $S/cfg$n --quiet
done
for a in "maml_gs --filters 1$(printf '0%.0s' {1..200})" "maml_gs --resnet-width 1$(printf '0%.0s' {1..200})" \
         "maml_gs --tasks 1$(printf '0%.0s' {1..400})" "mamlpp_gs --inner-steps 10000000000000000000" \
         "metasgd_gs --inner-steps 10000000000000000000" "cml --colearner-blocks 10000000 --filters 48" \
         "lwdgh --test-inner-steps 10000000000000000000" "lwdgh --no-ee --p-min 0.5"; do
  case_ "${a:0:60}" $PY ${a%% *}.py $T ${a#* } --out $S/x$n
done
term_ 25 $S/t3 $PY maml_gs.py $T --epochs 1 --test-tasks 100000 --eval-batch 5 --no-quiet
grep -q "interrupted during the meta-test" $S/t3.log && [ ! -e $S/t3/result.json ] ||
  { bad=$((bad+1)); echo "SIGTERM during the meta-test: not stopped between its batches"; }
U="$S/d"$'\xff'; mkdir -p "$U"; cp -r $D/omniglot-small "$U/"
case_ "non-UTF-8 --data-root" $PY maml_gs.py $O --data-root "$U" --out $S/u1
echo "faults: $n, tracebacks: $bad, hangs: $hung"
[ "$bad" -eq 0 ] && [ "$hung" -eq 0 ]
