"""CUT / FastCUT unpaired image-to-image translation (Park et al., ECCV 2020), in one package:

- `networks`: ResNet generator G, PatchGAN discriminator D, patch head F (plain PyTorch);
- `losses`: PatchNCE (Eq. 2-3) and the GAN losses (plain PyTorch);
- `data`: unpaired two-domain images (folders or procedural) and their LightningDataModule;
- `system`: `CUTSystem`, the Lightning training of G, D and F, rebuilt from a checkpoint by `msdiff.run.TrainedRun.open(ckpt).cut_system()`;
- `translate`: folder-to-folder translation with a trained generator and FID between folders.

It uses the shared plumbing (`msdiff.images`, `msdiff.checkpoint_file`, `msdiff.utils.mix_seed`),
not the score system. Configs: configs/cut*.yaml, configs/fastcut.yaml, configs/fmnist_*cut.yaml.
"""
