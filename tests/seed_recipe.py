from qthink.seed_recipe import seed_generate as seed_generate
