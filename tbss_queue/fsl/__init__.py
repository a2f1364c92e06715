"""Everything that knows FSL's TBSS, apart from the generic queue: fsl_reg's outputs
(`outputs`), tbss_2_reg's and tbss_3_postreg's arithmetic (`plan`), and the synthetic demo
study with its stand-in fsl_reg (`demo`, `standin`). The fsl_sub back end lives in the
`fsl_sub_plugin_tbss_queue` package beside this one."""
