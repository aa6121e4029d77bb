# Method flags with the papers' hyper-parameters (METHOD=vanilla|3ml|token-drop|sctd|random-ltd);
# sourced by the model configs, which set LAYERS, SEQ before sourcing. Sets METHOD_ARGS.
case "${METHOD:-vanilla}" in
  vanilla) METHOD_ARGS=() ;;
  # 3ML (Liao et al. 2022): mask 50%, no 80/10/10, encoder never sees [MASK]; decoder depth not
  # published (MAE-LM uses 4): 2 decoder layers with self-attention.
  3ml) METHOD_ARGS=(--method 3ml --decoder-layers 2 --3ml-decoder self --mask-prob 0.5) ;;
  # Token dropping (Hou et al. 2022, TF code): keep the top half by importance, beta 0.995.
  token-drop) METHOD_ARGS=(--method token-drop --td-keep-ratio 0.5 --td-beta 0.995) ;;
  # ScTD (Zhong et al. 2023, fairseq code): token dropping with beta 0.95, a consistency step
  # every 10 steps, 0.5/0.5 MLM + 0.05/0.05 KL at layers L-1 and L.
  sctd) METHOD_ARGS=(--method sctd --td-keep-ratio 0.5 --td-beta 0.95 --sctd-interval 10) ;;
  # random-LTD (DeepSpeed): kept length grows linearly from 128 to T in steps of 16.
  random-ltd) METHOD_ARGS=(--method random-ltd --ltd-start 128 --ltd-granularity 16 --ltd-steps "${LTD_STEPS:-100000}") ;;
  *) echo "METHOD=${METHOD}: choose vanilla, 3ml, token-drop, sctd or random-ltd" >&2; return 2 2>/dev/null || exit 2 ;;
esac
